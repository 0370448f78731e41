//! Time formatting for humans, without a date crate: RFC 3339 and compact UTC
//! stamps, and spans of time as configuration files write them (`7d`, `12h`).

use std::fmt;
use std::str::FromStr;

/// Formats Unix seconds as an RFC 3339 UTC timestamp, e.g. `2026-03-01T12:00:00Z`.
pub(crate) fn rfc3339_utc(unix_seconds: u64) -> String {
    let days = unix_seconds / 86_400;
    let rest = unix_seconds % 86_400;
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

/// Formats Unix seconds as a compact UTC stamp (ISO 8601 basic format), e.g.
/// `20260301T120000Z`: it sorts as the time does and fits a file name.
pub(crate) fn utc_stamp(unix_seconds: u64) -> String {
    let days = unix_seconds / 86_400;
    let rest = unix_seconds % 86_400;
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}{month:02}{day:02}T{:02}{:02}{:02}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

/// Parses a stamp [`utc_stamp`] made (`T` and `Z` in either case, so that a
/// lowercase snapshot name parses too); `None` for anything else, including
/// dates that do not exist and years before 1970.
pub(crate) fn parse_utc_stamp(text: &str) -> Option<u64> {
    let b = text.as_bytes();
    if b.len() != 16
        || !b[8].eq_ignore_ascii_case(&b'T')
        || !b[15].eq_ignore_ascii_case(&b'Z')
        || !b[..8].iter().chain(&b[9..15]).all(u8::is_ascii_digit)
    {
        return None;
    }
    let number = |range: std::ops::Range<usize>| -> u64 {
        b[range]
            .iter()
            .fold(0, |n, &d| n * 10 + u64::from(d - b'0'))
    };
    let (year, month, day) = (number(0..4), number(4..6), number(6..8));
    let (hour, minute, second) = (number(9..11), number(11..13), number(13..15));
    if year < 1970
        || !(1..=12).contains(&month)
        || day == 0
        || hour > 23
        || minute > 59
        || second > 59
    {
        return None;
    }
    let days = days_from_civil(year, month, day);
    // A day past the month's end (February 30th) comes back as another date.
    if civil_from_days(days) != (year, month, day) {
        return None;
    }
    Some(days * 86_400 + hour * 3600 + minute * 60 + second)
}

/// A span of time in whole seconds, as configuration files write it: a number
/// with a unit, `s`, `m`, `h`, `d` or `w` (`7d`, `12h`, `90m`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Period(pub(crate) u64);

impl Period {
    /// One day.
    pub(crate) const DAY: Period = Period(86_400);

    /// `n` days.
    pub(crate) const fn days(n: u64) -> Period {
        Period(n * 86_400)
    }

    /// The span in seconds.
    pub(crate) fn secs(self) -> u64 {
        self.0
    }
}

impl FromStr for Period {
    type Err = String;

    fn from_str(text: &str) -> Result<Period, String> {
        let trimmed = text.trim();
        let digits_end = trimmed
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(trimmed.len());
        let (digits, unit) = trimmed.split_at(digits_end);
        if digits.is_empty() || unit.is_empty() {
            return Err(format!(
                "{text:?} is not a duration (expected a number and a unit: s, m, h, d or w, \
                 such as 7d or 12h)"
            ));
        }
        let scale = match unit.trim() {
            "s" => 1,
            "m" => 60,
            "h" => 3600,
            "d" => 86_400,
            "w" => 7 * 86_400,
            other => {
                return Err(format!(
                    "{text:?} has an unknown unit {other:?} (use s, m, h, d or w)"
                ));
            }
        };
        digits
            .parse::<u64>()
            .ok()
            .and_then(|n| n.checked_mul(scale))
            .map(Period)
            .ok_or_else(|| format!("{text:?} is too long"))
    }
}

impl fmt::Display for Period {
    /// The largest exact unit: `14d`, `36h`, `90s`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        for (scale, unit) in [(86_400, "d"), (3600, "h"), (60, "m")] {
            if n != 0 && n.is_multiple_of(scale) {
                return write!(f, "{}{unit}", n / scale);
            }
        }
        write!(f, "{n}s")
    }
}

impl<'de> serde::Deserialize<'de> for Period {
    /// A string such as `"7d"`.
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Period, D::Error> {
        let text = String::deserialize(deserializer).map_err(|_: D::Error| {
            serde::de::Error::custom("expected a duration such as \"7d\" or \"12h\"")
        })?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Day count since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
/// `days_from_civil`, for years from 1970).
fn days_from_civil(year: u64, month: u64, day: u64) -> u64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y / 400;
    let yoe = y - era * 400;
    let mp = if month > 2 { month - 3 } else { month + 9 };
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`, for non-negative counts).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_dates() {
        assert_eq!(rfc3339_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339_utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339_utc(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339_utc(4_102_444_799), "2099-12-31T23:59:59Z");
    }

    #[test]
    fn stamps_round_trip() {
        for t in [0, 951_782_400, 1_700_000_000, 4_102_444_799, 1_600_000_061] {
            let stamp = utc_stamp(t);
            assert_eq!(parse_utc_stamp(&stamp), Some(t), "{stamp}");
            assert_eq!(parse_utc_stamp(&stamp.to_lowercase()), Some(t), "{stamp}");
        }
        assert_eq!(utc_stamp(1_700_000_000), "20231114T221320Z");
        // Every day of four years, leap day included.
        for day in 10_000..10_000 + 4 * 366 {
            let t = day * 86_400 + 3661;
            assert_eq!(parse_utc_stamp(&utc_stamp(t)), Some(t));
        }
    }

    #[test]
    fn stamps_refuse_nonsense() {
        for text in [
            "",
            "20231114T221320",
            "20231114X221320Z",
            "2023111aT221320Z",
            "19691231T235959Z",
            "20230230T000000Z",
            "20231301T000000Z",
            "20231100T000000Z",
            "20231114T241320Z",
            "20231114T226020Z",
            "20231114T221360Z",
            "20231114T221320Z ",
            "+0231114T221320Z",
        ] {
            assert_eq!(parse_utc_stamp(text), None, "{text:?}");
        }
    }

    #[test]
    fn periods() {
        for (text, secs) in [
            ("7d", 7 * 86_400),
            ("12h", 12 * 3600),
            ("90m", 5400),
            ("45s", 45),
            ("2w", 14 * 86_400),
            (" 14d ", 14 * 86_400),
            ("0d", 0),
        ] {
            assert_eq!(text.parse::<Period>(), Ok(Period(secs)), "{text}");
        }
        for text in [
            "",
            "7",
            "d",
            "1.5d",
            "-1d",
            "7 days",
            "7D",
            "99999999999999999999d",
        ] {
            assert!(text.parse::<Period>().is_err(), "{text:?}");
        }
        assert_eq!(Period::days(14).to_string(), "14d");
        assert_eq!(Period(36 * 3600).to_string(), "36h");
        assert_eq!(Period(90).to_string(), "90s");
        assert_eq!(Period(0).to_string(), "0s");
    }
}
