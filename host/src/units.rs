//! Parsing of the human-friendly values used in configuration: durations (`30s`,
//! `500ms`) and byte sizes (`65536`, `64KiB`, `1MiB`).

use std::time::Duration;

/// Parse a duration written as a whole number followed by a unit: `ms`, `s`, `m` or `h`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("`{text}` has no unit; write e.g. `30s` or `500ms`"))?;
    let (number, unit) = text.split_at(split);
    let value: u64 =
        number.parse().map_err(|_| format!("`{text}` is not a duration; write e.g. `30s` or `500ms`"))?;
    let millis = match unit.trim() {
        "ms" => Some(value),
        "s" => value.checked_mul(1_000),
        "m" => value.checked_mul(60_000),
        "h" => value.checked_mul(3_600_000),
        other => {
            return Err(format!("`{other}` is not a duration unit in `{text}`; use ms, s, m or h"));
        }
    };
    millis.map(Duration::from_millis).ok_or_else(|| format!("`{text}` is too long a duration"))
}

/// Parse a byte size: a plain count (`65536`) or a count with a unit (`B`, `KiB`,
/// `MiB`, `GiB`, and the decimal `KB`, `MB`, `GB`).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: u64 =
        number.parse().map_err(|_| format!("`{text}` is not a size; write e.g. `65536` or `64KiB`"))?;
    let scale: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        other => {
            return Err(format!("`{other}` is not a size unit in `{text}`; use B, KiB, MiB or GiB"));
        }
    };
    value.checked_mul(scale).ok_or_else(|| format!("`{text}` is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        for bad in ["30", "s", "", "1.5s", "10 parsecs", "-1s"] {
            assert!(parse_duration(bad).is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("65536"), Ok(65536));
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("2 GiB"), Ok(2 << 30));
        assert_eq!(parse_size("10KB"), Ok(10_000));
        for bad in ["", "KiB", "1.5MiB", "12 apples", "-4"] {
            assert!(parse_size(bad).is_err(), "{bad} should be rejected");
        }
    }
}
