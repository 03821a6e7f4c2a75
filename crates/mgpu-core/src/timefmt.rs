//! Parsing and printing of durations in the forms Slurm users type.
//!
//! Accepted: Slurm's `--time` forms exactly — a bare number is MINUTES (`90`), `MM:SS`,
//! `HH:MM:SS`, `D-HH`, `D-HH:MM`, `D-HH:MM:SS` — and unit suffixes (`30s`, `90m`, `2h`, `1d`).

/// What every time error says it accepts.
const FORMS: &str = "use minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS, or 30s/90m/2h/1d";

/// Parses a duration into seconds, the way Slurm reads `--time`: a bare number is minutes.
/// A sign is refused: `u64`'s parser would read `+10` as `10`, while Slurm's `+N`/`-N` mean a
/// change of a job's limit (`scontrol update TimeLimit=+N`), never a duration.
pub fn parse_duration(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let bad = || format!("invalid time '{text}': {FORMS}");
    if t.starts_with(['+', '-']) {
        return Err(signed(text, "time"));
    }
    if t.is_empty() || t.contains('+') {
        return Err(bad());
    }
    if let Some(unit) = t.chars().last().filter(|c| c.is_ascii_alphabetic()) {
        let factor = match unit.to_ascii_lowercase() {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86400,
            _ => return Err(bad()),
        };
        let n: u64 = t[..t.len() - 1].parse().map_err(|_| bad())?;
        return n.checked_mul(factor).ok_or_else(bad);
    }
    let (days, rest) = match t.split_once('-') {
        Some((d, rest)) => (d.parse::<u64>().map_err(|_| bad())?, Some(rest)),
        None => (0, None),
    };
    let num = |s: &str| s.parse::<u64>().map_err(|_| bad());
    // h * 3600 + m * 60 + s, refusing what does not fit.
    let hms = |h: u64, m: u64, s: u64| {
        h.checked_mul(3600)
            .and_then(|h| m.checked_mul(60).and_then(|m| h.checked_add(m)))
            .and_then(|hm| hm.checked_add(s))
            .ok_or_else(bad)
    };
    let secs = match rest {
        // D-HH, D-HH:MM, D-HH:MM:SS
        Some(rest) => {
            let parts: Vec<&str> = rest.split(':').collect();
            match parts.as_slice() {
                [h] => hms(num(h)?, 0, 0)?,
                [h, m] => hms(num(h)?, num(m)?, 0)?,
                [h, m, s] => hms(num(h)?, num(m)?, num(s)?)?,
                _ => return Err(bad()),
            }
        }
        None => {
            let parts: Vec<&str> = t.split(':').collect();
            match parts.as_slice() {
                // A bare number is minutes, as in Slurm.
                [m] => hms(0, num(m)?, 0)?,
                [m, s] => hms(0, num(m)?, num(s)?)?,
                [h, m, s] => hms(num(h)?, num(m)?, num(s)?)?,
                _ => return Err(bad()),
            }
        }
    };
    days.checked_mul(86400)
        .and_then(|d| d.checked_add(secs))
        .ok_or_else(bad)
}

/// Parses a job's time limit (Slurm's `--time`): `None` is no limit, which `0`, `UNLIMITED`
/// and `infinite` (any case) ask for, as in Slurm.
pub fn parse_time_limit(text: &str) -> Result<Option<u64>, String> {
    let t = text.trim();
    if t.eq_ignore_ascii_case("unlimited") || t.eq_ignore_ascii_case("infinite") {
        return Ok(None);
    }
    if t.starts_with(['+', '-']) {
        return Err(signed(text, "time limit"));
    }
    let secs = parse_duration(text).map_err(|_| {
        format!("invalid time limit '{text}': {FORMS}, or 0/UNLIMITED for no limit")
    })?;
    Ok((secs > 0).then_some(secs))
}

/// The error for a signed time: only a change of a job's limit takes a sign.
fn signed(text: &str, what: &str) -> String {
    format!(
        "invalid {what} '{}': a {what} takes no sign (+N/-N add to or take from a job's \
         limit only in 'mgpu_control update JOB TimeLimit=+N')",
        text.trim()
    )
}

/// Parses Slurm's relative `TimeLimit=+N` / `-N` (`scontrol update`): the change in seconds,
/// `None` when `text` has no sign (an absolute limit).
pub fn parse_time_limit_change(text: &str) -> Result<Option<i64>, String> {
    let t = text.trim();
    let (sign, rest) = match t.as_bytes().first() {
        Some(b'+') => (1, &t[1..]),
        Some(b'-') => (-1, &t[1..]),
        _ => return Ok(None),
    };
    let secs = parse_duration(rest)
        .ok()
        .and_then(|s| i64::try_from(s).ok())
        .ok_or_else(|| format!("invalid time limit change '{t}': + or - then {FORMS}"))?;
    Ok(Some(sign * secs))
}

/// Formats seconds like Slurm: `M:SS`, `H:MM:SS` or `D-HH:MM:SS`.
pub fn format_duration(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    if d > 0 {
        format!("{d}-{h:02}:{m:02}:{s:02}")
    } else if h > 0 {
        format!("{h}:{m:02}:{s:02}")
    } else {
        format!("{m}:{s:02}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_all_forms() {
        // A bare number is minutes, as in Slurm.
        assert_eq!(parse_duration("90"), Ok(5400));
        assert_eq!(parse_duration("10"), Ok(600));
        assert_eq!(parse_duration("0"), Ok(0));
        assert_eq!(parse_duration("1:05"), Ok(65));
        assert_eq!(parse_duration("01:30"), Ok(90));
        assert_eq!(parse_duration("1:00:00"), Ok(3600));
        assert_eq!(
            parse_duration("2-03:04:05"),
            Ok(2 * 86400 + 3 * 3600 + 4 * 60 + 5)
        );
        assert_eq!(parse_duration("1-2"), Ok(86400 + 7200));
        assert_eq!(parse_duration("1-2:30"), Ok(86400 + 7200 + 1800));
        assert_eq!(parse_duration("90m"), Ok(5400));
        assert_eq!(parse_duration("2h"), Ok(7200));
        assert_eq!(parse_duration("1d"), Ok(86400));
        assert_eq!(parse_duration("45s"), Ok(45));
    }

    #[test]
    fn time_limits_zero_and_unlimited_are_no_limit() {
        for none in [
            "0",
            "UNLIMITED",
            "unlimited",
            "infinite",
            "INFINITE",
            "0:00",
            "0s",
        ] {
            assert_eq!(parse_time_limit(none), Ok(None), "{none}");
        }
        assert_eq!(parse_time_limit("10"), Ok(Some(600)));
        assert_eq!(parse_time_limit("30s"), Ok(Some(30)));
        assert_eq!(parse_time_limit("0:01"), Ok(Some(1)));
        assert_eq!(parse_time_limit("1-0"), Ok(Some(86400)));
        let err = parse_time_limit("soon").unwrap_err();
        assert!(err.contains("invalid time limit 'soon'"), "{err}");
        assert!(parse_time_limit("forever").is_err());
        assert!(parse_time_limit("-1").is_err());
    }

    #[test]
    fn signs_are_refused_in_durations_and_limits() {
        for signed in ["+10", "-10", "+1:00:00", " +5", "+30s"] {
            let err = parse_duration(signed).unwrap_err();
            assert!(err.contains("takes no sign"), "{signed}: {err}");
            let err = parse_time_limit(signed).unwrap_err();
            assert!(
                err.contains("time limit") && err.contains("no sign"),
                "{err}"
            );
        }
        // A sign inside is garbage too (u64's parser would take each part's `+`).
        for inner in ["1-+2", "1:+30", "+"] {
            assert!(parse_duration(inner).is_err(), "{inner}");
        }
    }

    #[test]
    fn time_limit_changes_are_signed_durations() {
        assert_eq!(parse_time_limit_change("+10"), Ok(Some(600)));
        assert_eq!(parse_time_limit_change("-1:00:00"), Ok(Some(-3600)));
        assert_eq!(parse_time_limit_change("+1-0"), Ok(Some(86400)));
        assert_eq!(parse_time_limit_change("30"), Ok(None));
        assert_eq!(parse_time_limit_change("UNLIMITED"), Ok(None));
        for bad in ["+", "-x", "++5", "+-5", "+UNLIMITED"] {
            let err = parse_time_limit_change(bad).unwrap_err();
            assert!(err.contains("invalid time limit change"), "{bad}: {err}");
        }
    }

    #[test]
    fn rejects_garbage() {
        for bad in [
            "",
            "abc",
            "1:2:3:4",
            "-5",
            "5x",
            "1-",
            "h",
            "99999999999999999999d",
            "999999999999999999",
            "1.5",
            "1:2:",
            "1h30m",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn formats_like_slurm() {
        assert_eq!(format_duration(5), "0:05");
        assert_eq!(format_duration(3600), "1:00:00");
        assert_eq!(format_duration(90061), "1-01:01:01");
    }
}
