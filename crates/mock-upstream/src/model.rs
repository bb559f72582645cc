//! The model-name language: a request's `model` string read as a [`Plan`] — failure
//! wrappers (outermost first), a base scenario and options. The grammar and what each
//! word does are in the crate docs; this module only parses, it answers nothing.

use std::time::Duration;

/// The base answer a `model` string asks for, once its wrappers let a request through.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Scenario {
    Fixture(String),
    Status(u16),
    Malformed,
    Truncated,
    /// `/v1/messages` only.
    Overloaded,
    Echo,
    Stall,
    /// A tool-calling turn; with `forever: false`, the answer once results came.
    Tools {
        forever: bool,
    },
}

/// The wait header a `flaky` status carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RetryAfter {
    None,
    /// `Retry-After: <seconds>`.
    Secs(u64),
    /// `retry-after-ms: <milliseconds>`.
    Millis(u64),
    /// `Retry-After: <HTTP-date this many seconds from now>`.
    DateIn(u64),
}

/// What a wrapper does to the requests it handles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fault {
    Status(u16, RetryAfter),
    DropMid,
    CloseMid,
    StallMid,
    NoByte,
    MalformedMid,
    OverloadedMid,
    /// Every frame but the terminator (`[DONE]` / `message_stop`), then a clean end.
    NoTerminator,
    /// Answers with the base scenario.
    Pass,
}

/// A parsed `model` string.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Plan {
    /// `(N, fault)`, outermost first.
    pub(crate) wrappers: Vec<(u32, Fault)>,
    pub(crate) scenario: Scenario,
    pub(crate) delay: Duration,
    /// Calls per declared tool in a `tools` turn.
    pub(crate) calls: u32,
    /// A tool the `tools` turn also calls, though the request does not declare it.
    pub(crate) undeclared: Option<String>,
    pub(crate) quiet: Quiet,
}

/// Stretches of a stream with nothing but keep-alives, or with nothing at all
/// (options `lead_ms`, `gap_ms`, `keepalive_ms`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Quiet {
    /// Before the first frame.
    pub(crate) lead: Duration,
    /// Between the first and the second frame.
    pub(crate) gap: Duration,
    /// A keep-alive this often during those stretches (the first at once); zero sends
    /// none: silence.
    pub(crate) every: Duration,
}

impl Plan {
    /// What request number `index` (0-based, of this model string) gets: a fault, or
    /// `None` for the base scenario.
    pub(crate) fn fault_for(&self, mut index: u32) -> Option<Fault> {
        for (n, fault) in &self.wrappers {
            if index < *n {
                return (*fault != Fault::Pass).then_some(*fault);
            }
            index -= n;
        }
        None
    }
}

/// Parses a `model` string: wrappers, base scenario and options.
pub(crate) fn parse_model(model: &str) -> Result<Plan, String> {
    let (base, query) = match model.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (model, None),
    };
    let mut delay = Duration::ZERO;
    let mut calls = 2;
    let mut undeclared = None;
    let mut quiet = Quiet {
        every: Duration::from_millis(100),
        ..Quiet::default()
    };
    for pair in query.into_iter().flat_map(|q| q.split('&')) {
        let number = |v: &str, what: &str| {
            v.parse::<u64>()
                .map_err(|_| format!("{what} must be an integer, got `{v}`"))
        };
        let ms = |v: &str, what: &str| number(v, what).map(Duration::from_millis);
        match pair.split_once('=') {
            Some(("delay_ms", v)) => delay = ms(v, "delay_ms")?,
            Some(("lead_ms", v)) => quiet.lead = ms(v, "lead_ms")?,
            Some(("gap_ms", v)) => quiet.gap = ms(v, "gap_ms")?,
            Some(("keepalive_ms", v)) => quiet.every = ms(v, "keepalive_ms")?,
            Some(("calls", n)) => {
                calls = u32::try_from(number(n, "calls")?)
                    .map_err(|_| format!("calls too large: {n}"))?;
            }
            Some(("call", name)) if !name.is_empty() => undeclared = Some(name.to_owned()),
            _ => {
                return Err(format!(
                    "unknown model option `{pair}` (known: delay_ms, lead_ms, gap_ms, \
                     keepalive_ms, calls, call)"
                ));
            }
        }
    }
    let mut wrappers = Vec::new();
    let mut rest = base;
    while let Some((head, tail)) = rest.split_once(':') {
        let fault = match head {
            "flaky" => None,
            "dropmid" => Some(Fault::DropMid),
            "closemid" => Some(Fault::CloseMid),
            "stall" => Some(Fault::StallMid),
            "nobyte" => Some(Fault::NoByte),
            "malformedmid" => Some(Fault::MalformedMid),
            "overloaded" => Some(Fault::OverloadedMid),
            "noend" => Some(Fault::NoTerminator),
            "pass" => Some(Fault::Pass),
            _ => break,
        };
        let (n, tail) = tail
            .split_once(':')
            .ok_or_else(|| format!("`{head}` needs `{head}:<N>:<scenario>`"))?;
        let n: u32 = n
            .parse()
            .map_err(|_| format!("`{head}:<N>`: N must be an integer, got `{n}`"))?;
        let (fault, tail) = match fault {
            Some(fault) => (fault, tail),
            None => {
                let (status, tail) = tail
                    .split_once(':')
                    .ok_or("`flaky` needs `flaky:<N>:<status>:<scenario>`")?;
                (parse_flaky_status(status)?, tail)
            }
        };
        wrappers.push((n, fault));
        rest = tail;
    }
    let scenario = if let Some(path) = rest.strip_prefix("fixture:") {
        Scenario::Fixture(path.to_owned())
    } else if let Some(code) = rest.strip_prefix("status:") {
        let code: u16 = code
            .parse()
            .map_err(|_| format!("status must be an HTTP status code, got `{code}`"))?;
        Scenario::Status(code)
    } else {
        match rest {
            "malformed" => Scenario::Malformed,
            "truncated" => Scenario::Truncated,
            "overloaded" => Scenario::Overloaded,
            "echo" => Scenario::Echo,
            "stall" => Scenario::Stall,
            "tools" => Scenario::Tools { forever: false },
            "tools-forever" => Scenario::Tools { forever: true },
            _ => return Err(format!("unknown model `{rest}`")),
        }
    };
    Ok(Plan {
        wrappers,
        scenario,
        delay,
        calls,
        undeclared,
        quiet,
    })
}

/// `429`, `429+ra2`, `429+ram150`, `503+radate3`.
fn parse_flaky_status(spec: &str) -> Result<Fault, String> {
    let (code, wait) = match spec.split_once('+') {
        Some((code, wait)) => (code, Some(wait)),
        None => (spec, None),
    };
    let code: u16 = code
        .parse()
        .ok()
        .filter(|c| (100..=999).contains(c))
        .ok_or_else(|| format!("flaky: `{code}` is not an HTTP status code"))?;
    let number = |v: &str| {
        v.parse::<u64>()
            .map_err(|_| format!("flaky: bad wait `+{}`", wait.unwrap_or_default()))
    };
    let retry_after = match wait {
        None => RetryAfter::None,
        Some(w) => {
            if let Some(v) = w.strip_prefix("radate") {
                RetryAfter::DateIn(number(v)?)
            } else if let Some(v) = w.strip_prefix("ram") {
                RetryAfter::Millis(number(v)?)
            } else if let Some(v) = w.strip_prefix("ra") {
                RetryAfter::Secs(number(v)?)
            } else {
                return Err(format!(
                    "flaky: unknown `+{w}` (use +ra<seconds>, +ram<ms> or +radate<seconds>)"
                ));
            }
        }
    };
    Ok(Fault::Status(code, retry_after))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn plain(scenario: Scenario, delay_ms: u64) -> Plan {
        Plan {
            wrappers: Vec::new(),
            scenario,
            delay: Duration::from_millis(delay_ms),
            calls: 2,
            undeclared: None,
            quiet: Quiet {
                every: Duration::from_millis(100),
                ..Quiet::default()
            },
        }
    }

    #[test]
    fn parses_models() {
        assert_eq!(
            parse_model("fixture:openai/chat-text-usage.sse?delay_ms=5"),
            Ok(plain(
                Scenario::Fixture("openai/chat-text-usage.sse".into()),
                5
            ))
        );
        assert_eq!(
            parse_model("status:429"),
            Ok(plain(Scenario::Status(429), 0))
        );
        assert_eq!(parse_model("echo"), Ok(plain(Scenario::Echo, 0)));
        assert_eq!(parse_model("stall"), Ok(plain(Scenario::Stall, 0)));
        assert_eq!(
            parse_model("overloaded?delay_ms=1"),
            Ok(plain(Scenario::Overloaded, 1))
        );
        assert!(parse_model("gpt-4o").is_err());
        assert!(parse_model("echo?speed=3").is_err());
        assert!(parse_model("status:abc").is_err());
    }

    #[test]
    fn parses_wrappers_and_counts_through_them() {
        let plan = parse_model("dropmid:1:flaky:2:429+ra3:pass:1:stall:1:tools?calls=3").unwrap();
        assert_eq!(
            plan.wrappers,
            vec![
                (1, Fault::DropMid),
                (2, Fault::Status(429, RetryAfter::Secs(3))),
                (1, Fault::Pass),
                (1, Fault::StallMid),
            ]
        );
        assert_eq!(plan.scenario, Scenario::Tools { forever: false });
        assert_eq!(plan.calls, 3);
        let faults: Vec<Option<Fault>> = (0..7).map(|i| plan.fault_for(i)).collect();
        assert_eq!(
            faults,
            vec![
                Some(Fault::DropMid),
                Some(Fault::Status(429, RetryAfter::Secs(3))),
                Some(Fault::Status(429, RetryAfter::Secs(3))),
                None,
                Some(Fault::StallMid),
                None,
                None,
            ]
        );
        for (spec, fault) in [
            ("flaky:1:500:echo", Fault::Status(500, RetryAfter::None)),
            (
                "flaky:1:429+ram150:echo",
                Fault::Status(429, RetryAfter::Millis(150)),
            ),
            (
                "flaky:1:503+radate2:echo",
                Fault::Status(503, RetryAfter::DateIn(2)),
            ),
            ("closemid:1:echo", Fault::CloseMid),
            ("nobyte:1:echo", Fault::NoByte),
            ("malformedmid:1:echo", Fault::MalformedMid),
            ("overloaded:1:echo", Fault::OverloadedMid),
        ] {
            let plan = parse_model(spec).unwrap();
            assert_eq!(plan.wrappers, vec![(1, fault)], "{spec}");
            assert_eq!(plan.scenario, Scenario::Echo, "{spec}");
        }
        for bad in [
            "flaky:x:500:echo",
            "flaky:1:echo",
            "flaky:1:429+wait3:echo",
            "dropmid:echo",
            "dropmid:1:nope",
            "tools?calls=x",
        ] {
            assert!(parse_model(bad).is_err(), "{bad}");
        }
    }
}
