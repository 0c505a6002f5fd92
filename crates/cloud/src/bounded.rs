//! Client text, bounded. Whatever a client controls — a row field quoted in
//! a rejection reason, a model key, a tensor or metric name, an id echoed
//! back — ends up in the round's DynamoDB item (400 KB per item), in the
//! round result Step Functions carries (256 KiB per state output) and in
//! log lines. Unbounded, one client's 300 KB field makes the round item
//! unwritable and the round fails for everyone (issue #13).
//!
//! Everything goes through [`bound`]: at most a fixed number of bytes, cut on
//! a char boundary, control and bidirectional-formatting characters escaped
//! (no forged log lines, no text that reads differently than it is), and a
//! visible `…(+N bytes)` where it was cut, N counting the original bytes
//! left out.

/// A round's failure, which joins the reasons of every client: stored once
/// in the round item, sent as the task failure's cause (Step Functions
/// takes up to 32 768 characters there).
pub const FAILURE_BYTES: usize = 16 * 1024;

/// A whole rejection or failure reason, as stored per client. Reasons name
/// their rule first, so 512 bytes keep the rule, the quoted values and the
/// context. Rounds of more than 192 clients store shorter ones: their
/// reasons share a fixed budget (`capacity::reason_bytes`), so a round of
/// the 1,000 clients a job may list still fits in one DynamoDB item.
pub const REASON_BYTES: usize = 512;

/// One client-controlled value quoted inside a reason (a key, a checksum, a
/// `job_round`, a tensor name). Short enough that a reason quoting two or
/// three of them still fits in [`REASON_BYTES`] with its rule.
pub const QUOTE_BYTES: usize = 128;

/// The longest cut marker: `…(+` and ` bytes)` around up to 20 digits.
const MARKER_MAX: usize = "…(+".len() + 20 + " bytes)".len();

/// `text` with control and bidi characters escaped, at most `max_bytes`
/// bytes long (for `max_bytes` below 32, the cut marker alone may exceed
/// it). Text that fits and needs no escaping comes back unchanged.
pub fn bound(text: &str, max_bytes: usize) -> String {
    if let Some(whole) = escaped_within(text, max_bytes) {
        return whole;
    }
    // Too long: keep what fits before the longest marker could, so the
    // result with its marker is within `max_bytes` whatever N is.
    let budget = max_bytes.saturating_sub(MARKER_MAX);
    let mut out = String::with_capacity(max_bytes);
    let mut consumed = 0;
    for (i, c) in text.char_indices() {
        if !push_escaped(&mut out, c, budget) {
            break;
        }
        consumed = i + c.len_utf8();
    }
    out.push_str(&format!("…(+{} bytes)", text.len() - consumed));
    out
}

/// A reason to store or log: [`bound`] to [`REASON_BYTES`].
pub fn reason(text: &str) -> String {
    bound(text, REASON_BYTES)
}

/// A round's failure reason: [`bound`] to [`FAILURE_BYTES`].
pub fn failure(text: &str) -> String {
    bound(text, FAILURE_BYTES)
}

/// A client value to quote inside a reason: [`bound`] to [`QUOTE_BYTES`].
pub fn quote(text: &str) -> String {
    bound(text, QUOTE_BYTES)
}

/// The escaped text if all of it fits in `max_bytes`.
fn escaped_within(text: &str, max_bytes: usize) -> Option<String> {
    if text.len() <= max_bytes && !text.chars().any(needs_escape) {
        return Some(text.to_string());
    }
    let mut out = String::with_capacity(text.len().min(max_bytes));
    text.chars()
        .all(|c| push_escaped(&mut out, c, max_bytes))
        .then_some(out)
}

/// Appends `c` (escaped if need be) unless that would pass `max_bytes`.
fn push_escaped(out: &mut String, c: char, max_bytes: usize) -> bool {
    if needs_escape(c) {
        let e = c.escape_default().to_string();
        if out.len() + e.len() > max_bytes {
            return false;
        }
        out.push_str(&e);
    } else {
        if out.len() + c.len_utf8() > max_bytes {
            return false;
        }
        out.push(c);
    }
    true
}

/// C0/C1 controls (newlines, escape sequences) and the bidirectional
/// formatting characters that make text display in another order.
fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_text_is_unchanged() {
        for s in ["", "checksum: `abc` is not a SHA-256", "précis ✓ 日本"] {
            assert_eq!(reason(s), s);
        }
        let exact = "x".repeat(REASON_BYTES);
        assert_eq!(reason(&exact), exact);
    }

    #[test]
    fn long_text_is_cut_and_marked() {
        let long = "y".repeat(10_000);
        let r = reason(&long);
        assert!(r.len() <= REASON_BYTES, "{}", r.len());
        let kept = r.find('…').unwrap();
        assert!(kept > REASON_BYTES - MARKER_MAX - 1);
        assert!(r[..kept].bytes().all(|b| b == b'y'));
        assert!(r.ends_with(&format!("…(+{} bytes)", 10_000 - kept)), "{r}");
    }

    #[test]
    fn multibyte_text_is_cut_on_a_char_boundary() {
        // 3-byte and 4-byte chars, so no cut point lines up by chance.
        for unit in ["日", "🦀", "é日🦀"] {
            let long = unit.repeat(1000);
            for max in [40, 41, 42, 43, 100, REASON_BYTES] {
                let r = bound(&long, max);
                assert!(r.len() <= max, "{unit} {max}: {} bytes", r.len());
                let kept = &r[..r.find('…').unwrap()];
                assert!(long.starts_with(kept), "{unit} {max}: {r}");
                let omitted = long.len() - kept.len();
                assert!(r.ends_with(&format!("(+{omitted} bytes)")), "{r}");
            }
        }
    }

    #[test]
    fn control_and_bidi_characters_are_escaped() {
        assert_eq!(
            reason("a\nb\r\tc\u{1b}[31m\u{0}"),
            "a\\nb\\r\\tc\\u{1b}[31m\\u{0}"
        );
        assert_eq!(reason("x\u{202e}y\u{2066}"), "x\\u{202e}y\\u{2066}");
        assert_eq!(reason("\u{85}"), "\\u{85}");
        // Escapes count against the bound too.
        let r = reason(&"\n".repeat(1000));
        assert!(r.len() <= REASON_BYTES);
        assert!(r.starts_with("\\n\\n") && !r.contains('\n'), "{r}");
    }

    #[test]
    fn a_quote_is_shorter_than_a_reason() {
        let q = quote(&"k".repeat(1000));
        assert!(q.len() <= QUOTE_BYTES);
        assert!(q.ends_with(" bytes)"));
    }
}
