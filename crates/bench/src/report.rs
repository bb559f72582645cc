//! Percentiles and Markdown tables (so the output pastes into BENCHMARKS.md as is).

/// The value at quantile `q` (0..=1) of sorted samples (nearest rank).
pub fn quantile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Microseconds as milliseconds with two decimals.
pub fn ms(us: u64) -> String {
    format!("{:.2}", us as f64 / 1000.0)
}

/// A number with thousands separators.
pub fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Prints a Markdown table.
pub fn table(headers: &[&str], rows: &[Vec<String>]) {
    let mut w: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if i < w.len() {
                w[i] = w[i].max(c.chars().count());
            }
        }
    }
    let line = |cells: Vec<String>| {
        let cells: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:>width$}", width = w[i]))
            .collect();
        println!("| {} |", cells.join(" | "));
    };
    line(headers.iter().map(|h| (*h).to_owned()).collect());
    println!(
        "|{}|",
        w.iter()
            .map(|n| format!("{}:", "-".repeat(n + 1)))
            .collect::<Vec<_>>()
            .join("|")
    );
    for r in rows {
        line(r.clone());
    }
    println!();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_and_formats() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(quantile(&v, 0.5), 50);
        assert_eq!(quantile(&v, 0.99), 99);
        assert_eq!(quantile(&v, 1.0), 100);
        assert_eq!(quantile(&[], 0.5), 0);
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(thousands(999), "999");
        assert_eq!(ms(1234), "1.23");
    }
}

/// The interval in which every job was producing tokens: from the latest first token
/// to the earliest last event, given each job's append instants (seq 0, `created`, is
/// before the first token). `None` when the jobs never all ran at once.
#[derive(Clone, Copy)]
pub struct AllRunning {
    pub start: std::time::Instant,
    pub end: std::time::Instant,
}

impl AllRunning {
    pub fn of(appended: &[Vec<std::time::Instant>]) -> Option<AllRunning> {
        let start = appended.iter().filter_map(|v| v.get(1)).max().copied()?;
        let end = appended.iter().filter_map(|v| v.last()).min().copied()?;
        (end > start).then_some(AllRunning { start, end })
    }

    pub fn contains(&self, at: std::time::Instant) -> bool {
        at >= self.start && at <= self.end
    }

    /// `events` per second over the interval.
    pub fn rate(&self, events: u64) -> f64 {
        events as f64 / (self.end - self.start).as_secs_f64()
    }
}
