//! Parsing of the human-friendly values used in configuration: durations (`30s`,
//! `500ms`) and byte sizes (`65536`, `64KiB`, `1MiB`).
//!
//! The grammar is the crates': `humantime` for durations (`30s`, `500ms`, `2m`, `1h`,
//! `1h 30m`, `1.5s`, and the long unit names), `bytesize` for sizes (a byte count, or a
//! number with a unit: `KiB`, `MiB`, `GiB`, … and the decimal `KB`, `MB`, `GB`, …,
//! any case, a space allowed). Each is wrapped where it would accept what the host
//! must not:
//!
//! - humantime goes down to nanoseconds and up to `u64::MAX` seconds. The host's
//!   timers and plugin deadlines count whole milliseconds (a `1ns` heartbeat would
//!   pass the "longer than zero" check and ping in a loop; a `500us` deadline would
//!   silently be one epoch tick, 1ms), and `Instant + Duration` panics past about
//!   292 billion years, so a duration must be a whole number of milliseconds that
//!   fits in a `u64` of them, as it had to be before the crate.
//! - bytesize saturates instead of failing (`99999999999GiB` is `u64::MAX`, which as a
//!   limit means none), and refuses surrounding whitespace that TOML strings and
//!   shells leave in. Saturation is refused as "too large"; the text is trimmed.
//!
//! Printing: `format_duration` is humantime's, but
//! `format_size` is our own, because bytesize prints one rounded decimal (`976.6 KiB`
//! for 1,000,000 bytes) and a limit in an error message must be shown exactly.

use std::time::Duration;

/// Parse a duration: a number and a unit (`ms`, `s`, `m`, `h`, `d`, or their long
/// names), several of them summed (`1m 30s`), a fraction allowed (`1.5s`). The result
/// is a whole number of milliseconds; months and years are refused.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    // humantime reads `M` as months beside `m` for minutes: a one-key typo that makes a
    // timeout thirty thousand times longer. Calendar units have no place in a server's
    // timings, so they are refused.
    let calendar = text
        .split(|c: char| !c.is_ascii_alphabetic())
        .any(|unit| matches!(unit, "M" | "month" | "months" | "y" | "year" | "years"));
    if calendar {
        return Err(format!("`{text}` uses a calendar unit (months or years); write e.g. `5m` for minutes"));
    }
    let duration = humantime::parse_duration(text)
        .map_err(|error| format!("`{text}` is not a duration ({error}); write e.g. `30s` or `500ms`"))?;
    if !duration.subsec_nanos().is_multiple_of(1_000_000) {
        return Err(format!("`{text}` is finer than a millisecond; durations count whole milliseconds"));
    }
    if duration.as_millis() > u128::from(u64::MAX) {
        return Err(format!("`{text}` is too long a duration"));
    }
    Ok(duration)
}

/// Parse a byte size: a plain count (`65536`) or a count with a unit (`B`, `KiB`,
/// `MiB`, `GiB`, and the decimal `KB`, `MB`, `GB`; a fraction allowed: `1.5MiB`).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    // bytesize's own message (`Failed to parse unit "app..."`) says less than ours.
    let size: bytesize::ByteSize = text.parse().map_err(|_| {
        format!(
            "`{text}` is not a size; write a byte count or a number with a unit \
             (B, KiB, MiB, GiB, KB, MB, GB), e.g. `65536` or `64KiB`"
        )
    })?;
    // bytesize saturates: `u64::MAX` means the number did not fit.
    if size.as_u64() == u64::MAX {
        return Err(format!("`{text}` is too large"));
    }
    Ok(size.as_u64())
}

/// `10ms`, `2s`, `1s 500ms`: humantime's, which `units::parse_duration` reads back.
pub fn format_duration(duration: Duration) -> String {
    humantime::format_duration(duration).to_string()
}

/// `32MiB`, `1536KiB`, `1000 bytes`. Our own rather than bytesize's display, which
/// rounds to one decimal (`976.6 KiB`, `256.0 MiB` for one byte more): a limit in an
/// error message is shown exactly, in the units `NAME.toml` is written in.
pub fn format_size(bytes: u64) -> String {
    if bytes >= 1 << 30 && bytes.is_multiple_of(1 << 30) {
        format!("{}GiB", bytes >> 30)
    } else if bytes >= 1 << 20 && bytes.is_multiple_of(1 << 20) {
        format!("{}MiB", bytes >> 20)
    } else if bytes >= 1 << 10 && bytes.is_multiple_of(1 << 10) {
        format!("{}KiB", bytes >> 10)
    } else {
        format!("{bytes} bytes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printed_values_are_exact_and_read_back() {
        assert_eq!(format_duration(Duration::from_millis(10)), "10ms");
        assert_eq!(format_duration(Duration::from_secs(2)), "2s");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1s 500ms");
        assert_eq!(parse_duration("1s 500ms"), Ok(Duration::from_millis(1500)));
        assert_eq!(format_size(32 << 20), "32MiB");
        assert_eq!(format_size(3 << 30), "3GiB");
        assert_eq!(format_size(1000), "1000 bytes");
        assert_eq!(parse_size(&format_size(1536 << 10)), Ok(1536 << 10));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        for bad in
            ["30", "s", "", "10 parsecs", "-1s", "1ns", "500us", "1.5ms", "5M", "1month", "2y", "1year"]
        {
            assert!(parse_duration(bad).is_err(), "{bad} should be rejected");
        }
    }

    /// Every way a duration is written in DESIGN.md, README.md, `--help`, the tests and
    /// the plugins' `NAME.toml` files, plus what the crate adds.
    #[test]
    fn documented_durations() {
        let ms = Duration::from_millis;
        for (text, expected) in [
            ("0s", ms(0)),
            ("1ms", ms(1)),
            ("5ms", ms(5)),
            ("10ms", ms(10)),
            ("50ms", ms(50)),
            ("300ms", ms(300)),
            ("500ms", ms(500)),
            ("1s", ms(1_000)),
            ("2s", ms(2_000)),
            ("5s", ms(5_000)),
            ("7s", ms(7_000)),
            ("10s", ms(10_000)),
            ("20s", ms(20_000)),
            ("30s", ms(30_000)),
            ("2m", ms(120_000)),
            ("1h", ms(3_600_000)),
            (" 30s ", ms(30_000)),
            ("30 s", ms(30_000)),
            ("1m 30s", ms(90_000)),
            ("1.5s", ms(1_500)),
            ("2sec", ms(2_000)),
            ("1000us", ms(1)),
            ("0", ms(0)),
        ] {
            assert_eq!(parse_duration(text), Ok(expected), "{text}");
        }
    }

    #[test]
    fn durations_that_do_not_fit() {
        assert_eq!(parse_duration("18446744073709551s"), Ok(Duration::from_secs(18_446_744_073_709_551)));
        let text = parse_duration("18446744073709552s").unwrap_err();
        assert!(text.contains("too long"), "{text}");
        let text = parse_duration("99999999999999999999s").unwrap_err();
        assert!(text.contains("99999999999999999999s"), "{text}");
        let text = parse_duration("soon").unwrap_err();
        assert!(text.contains("`soon`") && text.contains("30s"), "{text}");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("65536"), Ok(65536));
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("2 GiB"), Ok(2 << 30));
        assert_eq!(parse_size("10KB"), Ok(10_000));
        for bad in ["", "KiB", "12 apples", "-4", "1e3", "."] {
            assert!(parse_size(bad).is_err(), "{bad} should be rejected");
        }
    }

    /// Every way a size is written in DESIGN.md, README.md, `--help`, the tests and the
    /// plugins' `NAME.toml` files, plus what the crate adds.
    #[test]
    fn documented_sizes() {
        for (text, expected) in [
            ("0", 0),
            ("1000", 1000),
            ("65536", 65536),
            ("64KiB", 64 << 10),
            ("64 KiB", 64 << 10),
            ("1MiB", 1 << 20),
            ("4MiB", 4 << 20),
            ("16MiB", 16 << 20),
            ("32MiB", 32 << 20),
            ("64MiB", 64 << 20),
            ("256MiB", 256 << 20),
            ("3GiB", 3 << 30),
            ("100B", 100),
            ("10KB", 10_000),
            ("10kB", 10_000),
            ("2MB", 2_000_000),
            ("1GB", 1_000_000_000),
            (" 64KiB ", 64 << 10),
            ("64kib", 64 << 10),
            ("1.5MiB", 3 << 19),
            ("18446744073709551614", u64::MAX - 1),
        ] {
            assert_eq!(parse_size(text), Ok(expected), "{text}");
        }
    }

    #[test]
    fn sizes_that_do_not_fit() {
        for text in ["99999999999GiB", "17EiB", "18446744073709551615", "99999999999999999999.5EiB"] {
            let error = parse_size(text).unwrap_err();
            assert!(error.contains("too large") || error.contains("not a size"), "{text}: {error}");
        }
        let error = parse_size("lots").unwrap_err();
        assert!(error.contains("`lots`") && error.contains("64KiB"), "{error}");
    }
}
