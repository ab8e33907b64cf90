//! Plain-text tables for the CLI.
//!
//! Cells are padded by hand, never through a format width: std panics on a width above
//! 65,535 ("Formatting argument out of range"), and a rule with 15,000 ports is a cell
//! longer than that. Columns are capped at [`MAX_CELL`] characters; a longer cell is cut
//! with a marker that says how much was cut (`-o json` carries every value whole).

use std::borrow::Cow;
use std::fmt::Write as _;

/// The widest a column grows, in characters.
pub const MAX_CELL: usize = 120;

/// `s` cut to at most `max` characters (at least 24 are kept), with a marker saying how
/// many characters were cut.
pub fn fit(s: &str, max: usize) -> Cow<'_, str> {
    let len = s.chars().count();
    if len <= max {
        return Cow::Borrowed(s);
    }
    let marker = format!("… [+{} chars, -o json for all]", len - max);
    let keep = max.saturating_sub(marker.chars().count()).max(24);
    let mut out: String = s.chars().take(keep).collect();
    out.push_str(&marker);
    Cow::Owned(out)
}

/// Appends `s` left-aligned in a column of `width` characters.
pub fn pad_into(out: &mut String, s: &str, width: usize) {
    out.push_str(s);
    for _ in s.chars().count()..width {
        out.push(' ');
    }
}

/// Rows of cells as aligned columns two spaces apart; each cell first [`fit`] to
/// [`MAX_CELL`]; trailing spaces trimmed. `indent` starts every line.
pub fn columns(out: &mut String, indent: &str, rows: &[Vec<String>]) {
    let fitted: Vec<Vec<Cow<'_, str>>> = rows.iter().map(|r| r.iter().map(|c| fit(c, MAX_CELL)).collect()).collect();
    let mut widths: Vec<usize> = Vec::new();
    for r in &fitted {
        for (i, c) in r.iter().enumerate() {
            let n = c.chars().count();
            match widths.get_mut(i) {
                Some(w) => *w = (*w).max(n),
                None => widths.push(n),
            }
        }
    }
    for r in &fitted {
        let mut line = String::from(indent);
        for (i, c) in r.iter().enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            pad_into(&mut line, c, widths[i]);
        }
        let _ = writeln!(out, "{}", line.trim_end());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cell_wider_than_any_format_width_is_cut_with_a_marker() {
        let wide = "TCP ".to_string() + &(1..40_000).map(|p| p.to_string()).collect::<Vec<_>>().join(",");
        let mut out = String::new();
        columns(&mut out, "  ", &[vec!["PREFIX".into(), "ALLOWS".into()], vec!["10.0.0.0/8".into(), wide.clone()]]);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[1].chars().count() < 200, "{}", lines[1]);
        assert!(lines[1].contains("chars, -o json for all]"), "{}", lines[1]);
        assert!(lines[1].starts_with("  10.0.0.0/8  TCP 1,2,3"));
    }

    #[test]
    fn short_cells_are_aligned_and_untouched() {
        let mut out = String::new();
        columns(&mut out, "", &[vec!["a".into(), "b".into()], vec!["ccc".into(), "d".into()]]);
        assert_eq!(out, "a    b\nccc  d\n");
        assert_eq!(fit("short", 10), "short");
    }
}
