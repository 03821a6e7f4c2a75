//! Tables that fit the terminal: text columns (names, commands, reasons) are cut with an
//! ellipsis, numbers and times never; when even cut text does not fit, the least useful columns
//! are left out, in an order each table gives.

/// How a column may give way when the table is too wide.
#[derive(Debug, Clone, Copy)]
pub struct Col {
    pub name: &'static str,
    /// Text that may be cut (with `…`) down to this many characters; `None`: never cut.
    pub cut_to: Option<usize>,
    /// Left out when the table is too wide, the highest first; 0: always shown.
    pub drop: u8,
}

impl Col {
    /// A column that is never cut nor left out.
    pub const fn keep(name: &'static str) -> Col {
        Col {
            name,
            cut_to: None,
            drop: 0,
        }
    }
    /// Text that may be cut down to `min` characters.
    pub const fn text(name: &'static str, min: usize) -> Col {
        Col {
            name,
            cut_to: Some(min),
            drop: 0,
        }
    }
    /// Left out (the highest `rank` first) when the table is too wide.
    pub const fn optional(self, rank: u8) -> Col {
        Col { drop: rank, ..self }
    }
}

fn len(s: &str) -> usize {
    s.chars().count()
}

/// `s` in at most `width` characters: cut with `…` when longer.
pub fn cut(s: &str, width: usize) -> String {
    if len(s) <= width {
        return s.to_string();
    }
    if width == 0 {
        return String::new();
    }
    let mut out: String = s.chars().take(width - 1).collect();
    out.push('…');
    out
}

/// The width the terminal gives us: `COLUMNS` when set, else the terminal on stdout, else
/// `None` (a pipe or a file: no limit, nothing is cut).
pub fn terminal_width() -> Option<usize> {
    if let Some(n) = std::env::var("COLUMNS")
        .ok()
        .and_then(|c| c.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
    {
        return Some(n);
    }
    // SAFETY: TIOCGWINSZ fills the winsize we own; fails harmlessly when stdout is no tty.
    unsafe {
        let mut ws: libc::winsize = std::mem::zeroed();
        (libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut ws) == 0 && ws.ws_col > 0)
            .then_some(ws.ws_col as usize)
    }
}

/// Which columns to show, and how wide: `(index, width)` in order. `sep` is the room each
/// shown column takes besides its text (padding, separators); `width` the room in all.
pub fn layout(
    cols: &[Col],
    rows: &[Vec<String>],
    sep: usize,
    width: Option<usize>,
) -> Vec<(usize, usize)> {
    let natural: Vec<usize> = cols
        .iter()
        .enumerate()
        .map(|(i, c)| {
            rows.iter()
                .filter_map(|r| r.get(i))
                .map(|s| len(s))
                .chain([len(c.name)])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut shown: Vec<usize> = (0..cols.len()).collect();
    let Some(width) = width else {
        return shown.iter().map(|&i| (i, natural[i])).collect();
    };
    let min = |i: usize| -> usize {
        match cols[i].cut_to {
            Some(m) => natural[i].min(m.max(len(cols[i].name).min(m))),
            None => natural[i],
        }
    };
    // Least useful first.
    let mut droppable: Vec<usize> = (0..cols.len()).filter(|&i| cols[i].drop > 0).collect();
    droppable.sort_by_key(|&i| std::cmp::Reverse(cols[i].drop));
    let mut drops = droppable.into_iter();
    loop {
        let needed: usize = shown.iter().map(|&i| min(i) + sep).sum();
        if needed <= width {
            break;
        }
        match drops.next() {
            Some(d) => shown.retain(|&i| i != d),
            None => break,
        }
    }
    // Cut columns start at their least and grow, one character at a time, while there is room.
    let mut widths: Vec<usize> = shown.iter().map(|&i| min(i)).collect();
    let mut room = width.saturating_sub(widths.iter().sum::<usize>() + sep * shown.len());
    while room > 0 {
        let mut grew = false;
        for (k, &i) in shown.iter().enumerate() {
            if room > 0 && widths[k] < natural[i] {
                widths[k] += 1;
                room -= 1;
                grew = true;
            }
        }
        if !grew {
            break;
        }
    }
    shown.into_iter().zip(widths).collect()
}

/// A plain table (like comfy-table's `NOTHING` preset: a space either side of each cell) that
/// fits `width` columns.
pub fn render(cols: &[Col], rows: &[Vec<String>], width: Option<usize>) -> String {
    let lay = layout(cols, rows, 2, width);
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut l = String::new();
        for (cell, &(_, w)) in cells.zip(&lay) {
            let c = cut(cell, w);
            l.push(' ');
            l.push_str(&c);
            l.extend(std::iter::repeat_n(' ', w - len(&c) + 1));
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&mut lay.iter().map(|&(i, _)| cols[i].name));
    for r in rows {
        line(
            &mut lay
                .iter()
                .map(|&(i, _)| r.get(i).map_or("", String::as_str)),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_cut_numbers_never_then_columns_go() {
        let cols = [
            Col::keep("ID"),
            Col::text("NAME", 4),
            Col::keep("WHEN").optional(1),
            Col::keep("HOURS"),
        ];
        let rows = vec![vec![
            "123456".to_string(),
            "a-rather-long-name".to_string(),
            "2026-12-01T10:00:00".to_string(),
            "12.345".to_string(),
        ]];
        let wide = render(&cols, &rows, None);
        assert!(wide.contains("a-rather-long-name") && wide.contains("2026-12-01T10:00:00"));
        let t = render(&cols, &rows, Some(50));
        assert!(t.lines().all(|l| len(l) <= 50), "{t}");
        assert!(t.contains("a-rather-lo…") || t.contains('…'), "{t}");
        assert!(
            t.contains("2026-12-01T10:00:00") && t.contains("12.345"),
            "{t}"
        );
        let t = render(&cols, &rows, Some(30));
        assert!(t.lines().all(|l| len(l) <= 30), "{t}");
        assert!(
            !t.contains("WHEN") && t.contains("123456") && t.contains("12.345"),
            "{t}"
        );
        assert_eq!(cut("abcdef", 4), "abc…");
        assert_eq!(cut("abc", 4), "abc");
    }
}
