//! Byte sizes as people write them: `10G`, `512M`, `4K`, `1GiB` or plain bytes.
//!
//! Suffixes are binary (K = 1024); a decimal point is refused, so that `1.5G` is
//! not silently rounded.

use std::fmt;
use std::str::FromStr;

/// A size in bytes, parsed from text with an optional binary suffix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Size(pub(crate) u64);

impl FromStr for Size {
    type Err = String;

    fn from_str(text: &str) -> Result<Size, String> {
        let text = text.trim();
        let digits_end = text
            .find(|c: char| !c.is_ascii_digit() && c != '_')
            .unwrap_or(text.len());
        let (digits, suffix) = text.split_at(digits_end);
        let digits: String = digits.chars().filter(|&c| c != '_').collect();
        if digits.is_empty() {
            return Err(format!(
                "{text:?} is not a size (expected bytes, or a number with K, M, G or T)"
            ));
        }
        let shift = match suffix.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 0,
            "k" | "kb" | "kib" => 10,
            "m" | "mb" | "mib" => 20,
            "g" | "gb" | "gib" => 30,
            "t" | "tb" | "tib" => 40,
            _ => {
                return Err(format!(
                    "{text:?} has an unknown unit {suffix:?} (use K, M, G or T, powers of 1024)"
                ));
            }
        };
        let number: u64 = digits
            .parse()
            .map_err(|_| format!("{text:?} is too large"))?;
        number
            .checked_mul(1u64 << shift)
            .map(Size)
            .ok_or_else(|| format!("{text:?} is too large"))
    }
}

impl fmt::Display for Size {
    /// The largest exact binary unit: `1G`, `1536M`, `4097` (bytes).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        for (shift, unit) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] {
            if n != 0 && n.is_multiple_of(1u64 << shift) {
                return write!(f, "{}{unit}", n >> shift);
            }
        }
        write!(f, "{n}")
    }
}

/// Bytes to one decimal in the largest binary unit that fits, for people:
/// `8.0 MiB`, `1023 B`.
pub(crate) fn approx(bytes: u64) -> String {
    let mut value = bytes as f64;
    for unit in ["B", "KiB", "MiB", "GiB"] {
        if value < 1024.0 {
            return if unit == "B" {
                format!("{bytes} B")
            } else {
                format!("{value:.1} {unit}")
            };
        }
        value /= 1024.0;
    }
    format!("{value:.1} TiB")
}

impl<'de> serde::Deserialize<'de> for Size {
    /// A TOML integer (bytes) or string (`"64M"`).
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Size, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bytes(u64),
            Text(String),
        }
        match Raw::deserialize(deserializer) {
            Ok(Raw::Bytes(n)) => Ok(Size(n)),
            Ok(Raw::Text(text)) => text.parse().map_err(serde::de::Error::custom),
            Err(_) => Err(serde::de::Error::custom(
                "expected a size: bytes as an integer, or a string such as \"64M\"",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units() {
        for (text, bytes) in [
            ("0", 0),
            ("4096", 4096),
            ("4K", 4096),
            ("4k", 4096),
            ("512M", 512 << 20),
            ("10G", 10 << 30),
            ("1GiB", 1 << 30),
            ("2T", 2 << 40),
            ("1_000", 1000),
            ("8 M", 8 << 20),
        ] {
            assert_eq!(text.parse::<Size>(), Ok(Size(bytes)), "{text}");
        }
    }

    #[test]
    fn refuses_nonsense() {
        for text in [
            "",
            "G",
            "1.5G",
            "-1",
            "10X",
            "99999999999999999999",
            "17179869184T",
        ] {
            assert!(text.parse::<Size>().is_err(), "{text}");
        }
    }

    #[test]
    fn approximates_for_people() {
        assert_eq!(approx(0), "0 B");
        assert_eq!(approx(1023), "1023 B");
        assert_eq!(approx(8 << 20), "8.0 MiB");
        assert_eq!(approx(1536 << 20), "1.5 GiB");
        assert_eq!(approx(3 << 40), "3.0 TiB");
    }

    #[test]
    fn displays_exact_units() {
        assert_eq!(Size(1 << 30).to_string(), "1G");
        assert_eq!(Size(1536 << 20).to_string(), "1536M");
        assert_eq!(Size(4097).to_string(), "4097");
        assert_eq!(Size(0).to_string(), "0");
    }
}
