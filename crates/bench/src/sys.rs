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

/// (utime, stime) of a `/proc/.../stat` line, in clock ticks.
fn stat_ticks(stat: &str) -> Option<(u64, u64)> {
    // The command name is in parentheses and may hold spaces: split after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After ')': field 3 (state) is f[0], so utime (14) is f[11] and stime (15) f[12].
    Some((f.get(11)?.parse().ok()?, f.get(12)?.parse().ok()?))
}

/// CPU time per thread: name, user ticks, system ticks.
pub type Ticks = HashMap<u32, (String, u64, u64)>;

/// CPU ticks of every live thread of this process, by thread id, with its name.
pub fn thread_ticks() -> Ticks {
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
        let Some((u, s)) = std::fs::read_to_string(p.join("stat"))
            .ok()
            .and_then(|s| stat_ticks(&s))
        else {
            continue;
        };
        out.insert(tid, (comm.trim().to_owned(), u, s));
    }
    out
}

/// CPU ticks of a whole process (all threads, living and dead).
pub fn process_ticks(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| stat_ticks(&s))
        .map_or(0, |(u, s)| u + s)
}

/// The machine's CPU ticks from `/proc/stat`: (busy, softirq, steal). Busy is user,
/// nice, system and irq; softirq (where loopback TCP delivery mostly runs, and which
/// the kernel does not charge to any thread) and steal are apart.
pub fn machine_ticks() -> (u64, u64, u64) {
    let s = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<u64> = s
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let get = |i: usize| f.get(i).copied().unwrap_or(0);
    // user nice system idle iowait irq softirq steal
    (get(0) + get(1) + get(2) + get(5), get(6), get(7))
}

/// Cores used by everything but this process over `window` (softirq and steal
/// included): a busy machine disturbs every figure, so the fan-out scenarios warn.
pub fn other_load(window: std::time::Duration) -> f64 {
    let (b0, s0, t0) = machine_ticks();
    let p0 = process_ticks(std::process::id());
    std::thread::sleep(window);
    let (b1, s1, t1) = machine_ticks();
    let p1 = process_ticks(std::process::id());
    let machine = (b1 + s1 + t1).saturating_sub(b0 + s0 + t0);
    machine.saturating_sub(p1 - p0) as f64 / clk_tck() / window.as_secs_f64()
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`).
pub fn clk_tck() -> f64 {
    rustix::param::clock_ticks_per_second() as f64
}

/// CPU seconds (user, system) spent between two [`thread_ticks`] snapshots by the
/// threads whose name satisfies `pick`. A thread that ended in between is missed; one
/// that started in between counts from zero.
pub fn cpu_secs_between(before: &Ticks, after: &Ticks, pick: impl Fn(&str) -> bool) -> (f64, f64) {
    let (mut user, mut sys) = (0u64, 0u64);
    for (tid, (name, u, s)) in after {
        if !pick(name) {
            continue;
        }
        let (bu, bs) = before.get(tid).map_or((0, 0), |(_, bu, bs)| (*bu, *bs));
        user += u.saturating_sub(bu);
        sys += s.saturating_sub(bs);
    }
    (user as f64 / clk_tck(), sys as f64 / clk_tck())
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

/// The machine's 1-minute load average (`/proc/loadavg`), 0 when unreadable.
pub fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}
