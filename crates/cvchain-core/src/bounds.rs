//! Sizes as Table storage counts them, and texts cut to fit.
//!
//! Table storage refuses a string property over 64 KiB (32 K UTF-16 units) and an entity over
//! 1 MiB, and it sees the text as the JSON request carries it, where a `"` or `\` takes two
//! units and a control character six (`\u0085`). A bound in characters is no bound: 30,000
//! U+0085 are 180,000 units, and such a row is refused on every delivery. So sizes are counted
//! as encoded, and a text over its bound is cut with a marker that says so.

/// A string property holds 64 KiB: 32 K UTF-16 units.
pub const MAX_PROPERTY_UNITS: usize = 32 * 1024;
/// An entity holds 1 MiB; the margin covers the keys, type annotations and the request's
/// own JSON.
pub const MAX_ENTITY_BYTES: usize = 1024 * 1024 - 64 * 1024;

/// UTF-16 units of `s` as a JSON string carries it, counting every character some encoder
/// escapes (C0 and C1 controls, U+2028, U+2029) as a six-unit `\uXXXX`.
pub fn encoded_units(s: &str) -> usize {
    s.chars().map(char_units).sum()
}

/// The length of a character's JSON escape, when JSON writers escape it.
fn escaped(c: char) -> Option<usize> {
    match c {
        '"' | '\\' | '\n' | '\r' | '\t' | '\u{8}' | '\u{c}' => Some(2),
        c if c.is_control() || matches!(c, '\u{2028}' | '\u{2029}') => Some(6),
        _ => None,
    }
}

fn char_units(c: char) -> usize {
    escaped(c).unwrap_or_else(|| c.len_utf16())
}

/// UTF-8 bytes of `s` as a JSON string carries it (what a request body and Azurite count).
pub fn encoded_bytes(s: &str) -> usize {
    s.chars()
        .map(|c| escaped(c).unwrap_or_else(|| c.len_utf8()))
        .sum()
}

/// `text` cut to at most `max_units` encoded units, marker included; true when cut. The cut
/// never leaves half a redaction marker behind, so a cut text does not look like a secret.
pub fn fit(text: &str, max_units: usize) -> (String, bool) {
    // No byte takes more than six units once escaped: most texts fit without counting.
    if text.len().saturating_mul(6) <= max_units || encoded_units(text) <= max_units {
        return (text.to_owned(), false);
    }
    let total = text.chars().count();
    // The marker's length depends on the count it reports; a generous estimate keeps it simple.
    let room = max_units.saturating_sub(marker(total, total).chars().count() + 8);
    let mut units = 0;
    let mut end = 0;
    let mut kept = 0;
    for (i, c) in text.char_indices() {
        let u = char_units(c);
        if units + u > room {
            break;
        }
        units += u;
        end = i + c.len_utf8();
        kept += 1;
    }
    let mut cut = &text[..end];
    // A cut may leave a key whose value it removed (`"sig":"` then the marker) or half a
    // redaction marker (`sig=RED`): either would read as a secret. Back off until it does not.
    for _ in 0..8 {
        let candidate = format!("{cut}{}", marker(kept, total));
        if crate::redact::find_leak(&candidate).is_none() {
            return (candidate, true);
        }
        let mut back = cut.len().saturating_sub(32);
        while !cut.is_char_boundary(back) {
            back -= 1;
        }
        kept -= cut[back..].chars().count();
        cut = &cut[..back];
    }
    (format!("{cut}{}", marker(kept, total)), true)
}

fn marker(kept: usize, total: usize) -> String {
    format!("…[cut by cvchain: {kept} of {total} characters kept]")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_counted_as_the_table_counts_them() {
        assert_eq!(encoded_units("ab"), 2);
        assert_eq!(encoded_units("\"\\"), 4);
        assert_eq!(encoded_units("\u{85}\u{1}"), 12);
        assert_eq!(encoded_units("😀"), 2);
        assert_eq!(encoded_units("é"), 1);
        assert_eq!(encoded_bytes("é"), 2);
        assert_eq!(encoded_bytes("€"), 3);
        assert_eq!(encoded_bytes("😀"), 4);
        assert_eq!(encoded_bytes("\u{85}"), 6);
        assert_eq!(encoded_bytes("\u{2028}"), 6);
    }

    #[test]
    fn long_texts_are_cut_with_a_marker_within_the_bound() {
        let text = "\u{85}".repeat(30_000);
        let (cut, was_cut) = fit(&text, MAX_PROPERTY_UNITS);
        assert!(was_cut);
        assert!(encoded_units(&cut) <= MAX_PROPERTY_UNITS);
        assert!(
            cut.ends_with("of 30000 characters kept]"),
            "{}",
            &cut[cut.len() - 60..]
        );
        assert_eq!(fit("short", 10), ("short".into(), false));
        // Half a redaction marker is dropped rather than left to look like a signature.
        let text = format!("{}sig=REDACTED{}", "x".repeat(100), "y".repeat(1000));
        for max in 120..200 {
            let (cut, _) = fit(&text, max);
            assert_eq!(crate::redact::find_leak(&cut), None, "{cut}");
        }
    }
}
