//! The answers the gateway writes itself: the block page (HTTP 403, styled by
//! `[http.block_page]`), the 307s of block pages elsewhere and of redirect rules, and the 526
//! page for an origin whose certificate fails verification.

use std::fmt::Write as _;

use waygate_config::BlockPageStyle;

use crate::decide::RuleRef;

/// Who was blocked and where, as the page and the context parameters show it.
#[derive(Debug, Clone)]
pub struct PageContext<'a> {
    /// The full URL requested.
    pub url: &'a str,
    /// The device's name.
    pub device: &'a str,
    /// The device's id.
    pub device_id: &'a str,
    /// The user's email.
    pub email: &'a str,
    /// The device's source address (its tunnel address).
    pub source_ip: String,
    /// When, RFC 3339 UTC.
    pub time: String,
}

/// Escapes text for HTML content and attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Percent-encodes a query parameter value (RFC 3986 unreserved characters stay).
fn encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// The built-in block page.
pub fn block_page(
    style: &BlockPageStyle,
    rule: &RuleRef,
    reason: Option<&str>,
    ctx: &PageContext<'_>,
) -> String {
    let color = style.background_color.as_deref().unwrap_or("#f2f4f7");
    let org = style.org_name.as_deref().unwrap_or("Waygate");
    let message = style
        .message
        .as_deref()
        .unwrap_or("This page was blocked by your organisation's policy.");
    let mut page = String::with_capacity(2048);
    let _ = write!(
        page,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width\">\
         <title>Blocked - {org}</title>\
         <style>body{{background:{color};font-family:sans-serif;margin:0;padding:2em}}\
         main{{background:#fff;max-width:40em;margin:auto;padding:2em;border-radius:8px}}\
         dt{{font-weight:bold}}</style></head><body><main>",
        org = escape(org),
        color = escape(color),
    );
    if let Some(logo) = &style.logo_url {
        let _ = write!(
            page,
            "<img id=\"logo\" src=\"{}\" alt=\"\" height=\"48\">",
            escape(logo)
        );
    }
    let _ = write!(
        page,
        "<h1 id=\"org\">{}</h1><p id=\"message\">{}</p>",
        escape(org),
        escape(message)
    );
    if let Some(reason) = reason {
        let _ = write!(page, "<p id=\"reason\">{}</p>", escape(reason));
    }
    let _ = write!(
        page,
        "<dl><dt>URL</dt><dd id=\"url\">{}</dd><dt>Rule</dt><dd id=\"rule\">{} ({})</dd>\
         <dt>Device</dt><dd id=\"device\">{}</dd><dt>Time</dt><dd id=\"time\">{}</dd></dl>",
        escape(ctx.url),
        escape(&rule.name),
        escape(&rule.id),
        escape(ctx.device),
        escape(&ctx.time),
    );
    if let Some(footer) = &style.footer {
        let _ = write!(page, "<footer id=\"footer\">{}</footer>", escape(footer));
    }
    page.push_str("</main></body></html>\n");
    page
}

/// The page for an origin whose certificate could not be verified (HTTP 526).
pub fn untrusted_page(host: &str) -> String {
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>526 Invalid SSL certificate</title></head><body>\
         <h1>Invalid SSL certificate</h1><p>The certificate of <b>{}</b> could not be \
         verified, so the gateway did not connect to it.</p></body></html>\n",
        escape(host)
    )
}

/// `target` with the context query parameters Cloudflare appends (`cf_site_uri`, `cf_rule_id`,
/// `cf_source_ip`, `cf_user_email`, `cf_device_id`).
pub fn with_context(target: &str, rule: &RuleRef, ctx: &PageContext<'_>) -> String {
    let sep = if target.contains('?') { '&' } else { '?' };
    format!(
        "{target}{sep}cf_site_uri={}&cf_rule_id={}&cf_source_ip={}&cf_user_email={}&cf_device_id={}",
        encode(ctx.url),
        encode(&rule.id),
        encode(&ctx.source_ip),
        encode(ctx.email),
        encode(ctx.device_id),
    )
}

/// Where a redirect rule sends a request for `path_and_query`.
pub fn redirect_location(target: &str, preserve: bool, path_and_query: &str) -> String {
    if !preserve {
        return target.to_string();
    }
    let base = target.trim_end_matches('/');
    format!("{base}{path_and_query}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> PageContext<'static> {
        PageContext {
            url: "http://a.example/x?q=<1>",
            device: "laptop",
            device_id: "dev-1",
            email: "ada@example.com",
            source_ip: "100.96.0.2".into(),
            time: "2026-12-05T02:00:00Z".into(),
        }
    }

    fn rule() -> RuleRef {
        RuleRef {
            id: "r1".into(),
            name: "No <script>".into(),
            action: "block".into(),
            untrusted_cert: None,
        }
    }

    #[test]
    fn the_block_page_shows_the_reason_rule_device_and_style_escaped() {
        let style = BlockPageStyle {
            org_name: Some("Example & Co".into()),
            logo_url: Some("https://example.com/l.png".into()),
            message: None,
            footer: Some("Call IT".into()),
            background_color: Some("#123456".into()),
        };
        let page = block_page(&style, &rule(), Some("gambling"), &ctx());
        for needle in [
            "Example &amp; Co",
            "<p id=\"reason\">gambling</p>",
            "No &lt;script&gt; (r1)",
            "laptop",
            "2026-12-05T02:00:00Z",
            "http://a.example/x?q=&lt;1&gt;",
            "#123456",
            "https://example.com/l.png",
            "Call IT",
        ] {
            assert!(page.contains(needle), "{needle} missing from {page}");
        }
        assert!(!page.contains("<script>"));
    }

    #[test]
    fn context_parameters_and_redirect_targets() {
        assert_eq!(
            with_context("https://b.example/blocked", &rule(), &ctx()),
            "https://b.example/blocked?cf_site_uri=http%3A%2F%2Fa.example%2Fx%3Fq%3D%3C1%3E&cf_rule_id=r1&cf_source_ip=100.96.0.2&cf_user_email=ada%40example.com&cf_device_id=dev-1"
        );
        assert_eq!(
            redirect_location("https://n.example/", true, "/a?b=1"),
            "https://n.example/a?b=1"
        );
        assert_eq!(
            redirect_location("https://n.example/", false, "/a?b=1"),
            "https://n.example/"
        );
    }
}
