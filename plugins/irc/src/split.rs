//! Splitting a message into `PRIVMSG`-sized lines.

/// Splits `text` into lines of at most `max_bytes` bytes each: one or more per line of the text
/// (a `\r\n` or `\n` ends a line; empty lines are dropped, IRC cannot send them), cut only between
/// characters, so every piece is valid UTF-8 and joining the pieces of a line gives it back.
pub fn split_message(text: &str, max_bytes: usize) -> Vec<String> {
    let max_bytes = max_bytes.max(4); // room for any one character
    let mut lines = Vec::new();
    for line in text.split('\n') {
        let mut rest = line.strip_suffix('\r').unwrap_or(line);
        while !rest.is_empty() {
            let mut cut = rest.len().min(max_bytes);
            while !rest.is_char_boundary(cut) {
                cut -= 1;
            }
            let (piece, tail) = rest.split_at(cut);
            lines.push(piece.to_owned());
            rest = tail;
        }
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::split_message;

    #[test]
    fn lines_newlines_and_utf8_boundaries() {
        assert_eq!(split_message("a\r\nb\n\nc", 10), ["a", "b", "c"]);
        assert_eq!(split_message("abcdef", 4), ["abcd", "ef"]);
        // "é" is 2 bytes, "€" 3: no piece may end inside either.
        let text = "é€é€é€";
        let pieces = split_message(text, 4);
        assert!(pieces.iter().all(|p| p.len() <= 4), "{pieces:?}");
        assert_eq!(pieces.concat(), text);
        assert_eq!(pieces, ["é", "€", "é", "€", "é", "€"]);
        assert!(split_message("", 10).is_empty());
    }

    #[test]
    fn a_long_line_keeps_every_byte_in_order() {
        let text: String = (0..2000)
            .map(|i| char::from(b'a' + (i % 26) as u8))
            .collect();
        let pieces = split_message(&text, 400);
        assert_eq!(pieces.len(), 5);
        assert_eq!(pieces.concat(), text);
    }
}
