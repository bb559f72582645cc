//! What the benchmarks read from the operating system: resident memory, CPU time per
//! thread, the open-file limit, and a description of the machine.

use std::collections::HashMap;
use std::process::Command;

use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

/// Raises RLIMIT_NOFILE's soft limit to its hard limit; returns the new soft limit.
/// Children spawned afterwards inherit it.
pub fn raise_nofile() -> u64 {
    let lim = getrlimit(Resource::Nofile);
    if lim.current != lim.maximum {
        let _ = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: lim.maximum,
                maximum: lim.maximum,
            },
        );
    }
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

/// `VmRSS` of a process, in bytes.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    status_kib(pid, "VmRSS:").map(|k| k * 1024)
}

/// A `kB` line of `/proc/PID/status`, in KiB.
pub fn status_kib(pid: u32, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Number of open file descriptors of a process.
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// utime + stime of a `/proc/.../stat` line, in clock ticks.
fn stat_ticks(stat: &str) -> Option<u64> {
    // The command name is in parentheses and may hold spaces: split after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After ')': field 3 (state) is f[0], so utime (14) is f[11] and stime (15) f[12].
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// CPU ticks of every live thread of this process, by thread id, with its name.
pub fn thread_ticks() -> HashMap<u32, (String, u64)> {
    let mut out = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for e in dir.flatten() {
        let Some(tid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let p = e.path();
        let comm = std::fs::read_to_string(p.join("comm")).unwrap_or_default();
        let Some(t) = std::fs::read_to_string(p.join("stat"))
            .ok()
            .and_then(|s| stat_ticks(&s))
        else {
            continue;
        };
        out.insert(tid, (comm.trim().to_owned(), t));
    }
    out
}

/// CPU ticks of a whole process (all threads, living and dead).
pub fn process_ticks(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| stat_ticks(&s))
        .unwrap_or(0)
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`).
pub fn clk_tck() -> f64 {
    rustix::param::clock_ticks_per_second() as f64
}

/// CPU seconds spent between two [`thread_ticks`] snapshots by the threads whose name
/// satisfies `pick`. A thread that ended in between is missed; one that started in
/// between counts from zero.
pub fn cpu_secs_between(
    before: &HashMap<u32, (String, u64)>,
    after: &HashMap<u32, (String, u64)>,
    pick: impl Fn(&str) -> bool,
) -> f64 {
    let ticks: u64 = after
        .iter()
        .filter(|(_, (name, _))| pick(name))
        .map(|(tid, (_, t))| t - before.get(tid).map_or(0, |(_, b)| *b).min(*t))
        .sum();
    ticks as f64 / clk_tck()
}

/// The machine, as BENCHMARKS.md records it: nproc, CPU model, memory, kernel, rustc.
pub fn machine() -> Vec<(&'static str, String)> {
    let run = |cmd: &str, args: &[&str]| {
        Command::new(cmd)
            .args(args)
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    };
    let model = run("lscpu", &[])
        .lines()
        .find(|l| l.starts_with("Model name:"))
        .map(|l| l.trim_start_matches("Model name:").trim().to_owned())
        .unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))?
                .split_whitespace()
                .nth(1)?
                .parse::<u64>()
                .ok()
        })
        .map(|kib| format!("{:.1} GiB", kib as f64 / 1024.0 / 1024.0))
        .unwrap_or_default();
    vec![
        ("nproc", run("nproc", &[])),
        ("CPU", model),
        ("memory", mem),
        ("kernel", run("uname", &["-sr"])),
        ("rustc", run("rustc", &["--version"])),
        (
            "RLIMIT_NOFILE",
            getrlimit(Resource::Nofile)
                .current
                .map_or("unlimited".into(), |n| n.to_string()),
        ),
    ]
}
