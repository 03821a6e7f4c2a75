//! Times as the user reads and types them: in the local zone (`TZ` honoured, as Slurm does),
//! printed like Slurm prints them (`2026-12-01T14:06:26`, no zone marker), and read back in
//! every form the tables print plus Slurm's `--starttime` forms.

use mgpu_core::Millis;

/// A moment broken down in the local zone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Local {
    pub year: i32,
    pub month: u32,
    pub day: u32,
    pub hour: u32,
    pub minute: u32,
    pub second: u32,
    /// Seconds east of UTC.
    pub offset_s: i64,
    /// The zone's abbreviation (`UTC`, `CET`), when the C library names one.
    pub zone: String,
}

extern "C" {
    /// POSIX tzset(3) (not bound by the libc crate).
    #[link_name = "tzset"]
    fn c_tzset();
}

fn tzset() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    // SAFETY: tzset reads TZ and the zone files; called once, before any localtime_r.
    ONCE.call_once(|| unsafe { c_tzset() });
}

/// `ms` since the epoch in the local zone (`TZ`, else /etc/localtime, else UTC).
pub fn local(ms: Millis) -> Local {
    tzset();
    let secs = (ms / 1000) as libc::time_t;
    // SAFETY: localtime_r fills the zeroed struct we own; tm_zone points into static storage.
    unsafe {
        let mut tm: libc::tm = std::mem::zeroed();
        if libc::localtime_r(&secs, &mut tm).is_null() {
            return Local {
                year: 1970,
                month: 1,
                day: 1,
                hour: 0,
                minute: 0,
                second: 0,
                offset_s: 0,
                zone: "UTC".into(),
            };
        }
        let zone = if tm.tm_zone.is_null() {
            String::new()
        } else {
            std::ffi::CStr::from_ptr(tm.tm_zone)
                .to_string_lossy()
                .into_owned()
        };
        Local {
            year: tm.tm_year + 1900,
            month: (tm.tm_mon + 1) as u32,
            day: tm.tm_mday as u32,
            hour: tm.tm_hour as u32,
            minute: tm.tm_min as u32,
            second: tm.tm_sec as u32,
            offset_s: tm.tm_gmtoff,
            zone,
        }
    }
}

/// Slurm's time form, local: `2026-12-01T14:06:26`.
pub fn iso(ms: Millis) -> String {
    let t = local(ms);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
        t.year, t.month, t.day, t.hour, t.minute, t.second
    )
}

/// `HH:MM` when `ms` is on the same local day as `now`, else `MM-DD HH:MM`.
pub fn short(ms: Millis, now: Millis) -> String {
    let (t, n) = (local(ms), local(now));
    if (t.year, t.month, t.day) == (n.year, n.month, n.day) {
        format!("{:02}:{:02}", t.hour, t.minute)
    } else {
        format!("{:02}-{:02} {:02}:{:02}", t.month, t.day, t.hour, t.minute)
    }
}

/// `HH:MM:SS` local, for a clock.
pub fn clock(ms: Millis) -> String {
    let t = local(ms);
    format!("{:02}:{:02}:{:02}", t.hour, t.minute, t.second)
}

/// Local wall-clock fields to ms since the epoch (mktime: the zone's rules, DST included).
fn from_local(year: i32, month: u32, day: u32, h: u32, m: u32, s: u32) -> Option<Millis> {
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || h > 23 || m > 59 || s > 60 {
        return None;
    }
    tzset();
    // SAFETY: mktime normalises the struct we own.
    let secs = unsafe {
        let mut tm: libc::tm = std::mem::zeroed();
        tm.tm_year = year - 1900;
        tm.tm_mon = month as i32 - 1;
        tm.tm_mday = day as i32;
        tm.tm_hour = h as i32;
        tm.tm_min = m as i32;
        tm.tm_sec = s as i32;
        tm.tm_isdst = -1;
        libc::mktime(&mut tm)
    };
    (secs >= 0).then_some(secs as Millis * 1000)
}

/// What a time option accepts, for its error message.
pub const WHEN_FORMS: &str = "use what mgpu_acct prints (2026-11-25T08:00:00, RFC 3339 with a zone, or MM-DD HH:MM), YYYY-MM-DD[THH:MM[:SS]], HH:MM[:SS] (today), MM/DD[/YY], today, yesterday, now-2hours, or a duration ago (90m, 2h, 7d)";

/// Reads a moment as the user types it: what the tables and `--json` print (local
/// `YYYY-MM-DDTHH:MM:SS`, RFC 3339 with a zone, `MM-DD HH:MM`, `HH:MM`), Slurm's `--starttime`
/// forms (`YYYY-MM-DD[THH:MM[:SS]]`, `MM/DD[/YY]`, `HH:MM[:SS]`, `today`, `yesterday`,
/// `now[-N[unit]]`), or a duration ago (`90m`, `2h`, `7d`, Slurm's `D-HH:MM:SS`). Local times
/// are in the user's zone.
pub fn parse_when(text: &str, now: Millis) -> Result<Millis, String> {
    let bad = || format!("invalid time '{text}': {WHEN_FORMS}");
    let t = text.trim();
    use time::format_description::well_known::Rfc3339;
    if let Ok(x) = time::OffsetDateTime::parse(t, &Rfc3339) {
        return Ok((x.unix_timestamp_nanos() / 1_000_000).max(0) as Millis);
    }
    let today = local(now);
    let midnight = |y, mo, d| from_local(y, mo, d, 0, 0, 0).ok_or_else(bad);
    match t.to_ascii_lowercase().as_str() {
        "now" => return Ok(now),
        "today" => return midnight(today.year, today.month, today.day),
        "yesterday" => {
            return midnight(today.year, today.month, today.day)
                .map(|m| m.saturating_sub(86_400_000))
        }
        "tomorrow" => return midnight(today.year, today.month, today.day).map(|m| m + 86_400_000),
        _ => {}
    }
    // now-N[seconds|minutes|hours|days|weeks]
    if let Some(rest) = t.to_ascii_lowercase().strip_prefix("now-") {
        let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
        let n: u64 = digits.parse().map_err(|_| bad())?;
        let unit = &rest[digits.len()..];
        let factor = match unit {
            "" | "s" | "sec" | "secs" | "second" | "seconds" => 1,
            "m" | "min" | "mins" | "minute" | "minutes" => 60,
            "h" | "hour" | "hours" => 3600,
            "d" | "day" | "days" => 86400,
            "w" | "week" | "weeks" => 7 * 86400,
            _ => return Err(bad()),
        };
        return Ok(now.saturating_sub(n.saturating_mul(factor).saturating_mul(1000)));
    }
    let num = |s: &str| -> Result<u32, String> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) || s.len() > 4 {
            return Err(bad());
        }
        s.parse().map_err(|_| bad())
    };
    // HH:MM[:SS] as a list of numbers.
    let clock = |s: &str| -> Result<(u32, u32, u32), String> {
        let p: Vec<&str> = s.split(':').collect();
        match p.as_slice() {
            [h, m] => Ok((num(h)?, num(m)?, 0)),
            [h, m, s] => Ok((num(h)?, num(m)?, num(s)?)),
            _ => Err(bad()),
        }
    };
    // A date, and maybe a time after `T` or a space.
    let (date, time_part) = match t.split_once(['T', ' ']) {
        Some((d, c)) => (d, Some(c.trim())),
        None => (t, None),
    };
    let ymd: Option<(i32, u32, u32)> = {
        let dash: Vec<&str> = date.split('-').collect();
        let slash: Vec<&str> = date.split('/').collect();
        match (dash.as_slice(), slash.as_slice()) {
            ([y, m, d], _) if y.len() == 4 => Some((num(y)? as i32, num(m)?, num(d)?)),
            // MM-DD (as mgpu_queue prints): this year.
            ([m, d], _) if m.len() <= 2 && d.len() <= 2 && time_part.is_some() => {
                Some((today.year, num(m)?, num(d)?))
            }
            (_, [m, d]) => Some((today.year, num(m)?, num(d)?)),
            (_, [m, d, y]) => {
                let y = num(y)? as i32;
                Some((if y < 100 { 2000 + y } else { y }, num(m)?, num(d)?))
            }
            _ => None,
        }
    };
    match (ymd, time_part) {
        (Some((y, mo, d)), None) => midnight(y, mo, d),
        (Some((y, mo, d)), Some(c)) => {
            let (h, m, s) = clock(c)?;
            from_local(y, mo, d, h, m, s).ok_or_else(bad)
        }
        (None, None) if t.contains(':') && !t.contains('-') => {
            let (h, m, s) = clock(t)?;
            from_local(today.year, today.month, today.day, h, m, s).ok_or_else(bad)
        }
        _ => {
            let ago = mgpu_core::timefmt::parse_duration(t).map_err(|_| bad())?;
            Ok(now.saturating_sub(ago.saturating_mul(1000)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Everything printed is read back to the same moment (to the second, or the minute for
    /// the short forms), whatever the zone the tests run in (the zone itself is checked end to
    /// end with TZ set).
    #[test]
    fn printed_times_read_back() {
        let now = 1_764_597_600_000; // 2025-12-01T14:00:00Z
        let t = now - 3_723_000;
        assert_eq!(parse_when(&iso(t), now), Ok(t));
        assert_eq!(parse_when(&short(t, now), now), Ok(t / 60_000 * 60_000));
        let old = now - 5 * 86_400_000;
        assert_eq!(parse_when(&short(old, now), now), Ok(old / 60_000 * 60_000));
        assert_eq!(parse_when("2025-12-01T14:00:00Z", now), Ok(now));
        assert_eq!(parse_when("2025-12-01T19:30:00+05:30", now), Ok(now));
        let day = local(now);
        let midnight = from_local(day.year, day.month, day.day, 0, 0, 0).unwrap();
        assert_eq!(parse_when("today", now), Ok(midnight));
        assert_eq!(parse_when("yesterday", now), Ok(midnight - 86_400_000));
        let date = format!("{:04}-{:02}-{:02}", day.year, day.month, day.day);
        assert_eq!(parse_when(&date, now), Ok(midnight));
        let us = format!("{:02}/{:02}/{:02}", day.month, day.day, day.year % 100);
        assert_eq!(parse_when(&us, now), Ok(midnight));
        assert_eq!(parse_when("now-2hours", now), Ok(now - 7_200_000));
        assert_eq!(parse_when("2h", now), Ok(now - 7_200_000));
        assert_eq!(parse_when(&clock(now), now), Ok(now));
        for bad in ["soon", "2025-13-01", "25:00", "now-x", "1-2-3-4", ""] {
            assert!(parse_when(bad, now).is_err(), "{bad}");
        }
    }
}
