//! Parsing and printing of durations in the forms Slurm users type.
//!
//! Accepted: plain seconds (`90`), `MM:SS`, `HH:MM:SS`, `D-HH`, `D-HH:MM`, `D-HH:MM:SS`, and
//! unit suffixes (`90s`, `30m`, `2h`, `1d`). Note: unlike Slurm's `--time`, a bare number is
//! seconds, not minutes.

/// Parses a time limit into seconds.
pub fn parse_duration(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let bad =
        || format!("invalid time '{text}': use seconds, MM:SS, HH:MM:SS, D-HH:MM:SS, or 90m/2h/1d");
    if t.is_empty() {
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
    let secs = match rest {
        // D-HH, D-HH:MM, D-HH:MM:SS
        Some(rest) => {
            let parts: Vec<&str> = rest.split(':').collect();
            match parts.as_slice() {
                [h] => num(h)? * 3600,
                [h, m] => num(h)? * 3600 + num(m)? * 60,
                [h, m, s] => num(h)? * 3600 + num(m)? * 60 + num(s)?,
                _ => return Err(bad()),
            }
        }
        None => {
            let parts: Vec<&str> = t.split(':').collect();
            match parts.as_slice() {
                [s] => num(s)?,
                [m, s] => num(m)? * 60 + num(s)?,
                [h, m, s] => num(h)? * 3600 + num(m)? * 60 + num(s)?,
                _ => return Err(bad()),
            }
        }
    };
    days.checked_mul(86400)
        .and_then(|d| d.checked_add(secs))
        .ok_or_else(bad)
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
        assert_eq!(parse_duration("90"), Ok(90));
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
