//! Times as the admin API writes them (RFC 3339 in UTC, as Cloudflare's API does), from unix
//! seconds; nothing here reads a clock.

use waygate_model::calendar::utc_fields;

/// `2026-11-22T15:24:56Z` for unix seconds.
pub fn rfc3339(unix: i64) -> String {
    let (y, m, d, hh, mm, ss) = utc_fields(unix);
    format!("{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}Z")
}

/// `2026-11-22 15:23:16 UTC` for unix seconds, as the command line prints times.
pub fn utc(unix: i64) -> String {
    let (y, m, d, hh, mm, ss) = utc_fields(unix);
    format!("{y:04}-{m:02}-{d:02} {hh:02}:{mm:02}:{ss:02} UTC")
}

#[cfg(test)]
mod tests {
    #[test]
    fn rfc3339_in_utc() {
        assert_eq!(super::rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(super::rfc3339(1_795_361_096), "2026-11-22T15:24:56Z");
    }
}
