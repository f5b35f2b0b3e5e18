//! Tokenizer for the wirefilter dialect. Numbers, addresses, CIDRs, ranges, field names and
//! keywords all lex as one `Word` (they share characters: `10.0.0.0/8`, `dns.fqdn`, `fe80::1`,
//! `8000..8999`); the parser classifies a word by where it appears.

use super::error::{ExprError, ExprErrorKind, Pos};

/// One token.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Tok {
    /// A field name, keyword, number, address, CIDR or range.
    Word(String),
    /// A quoted string: `cooked` has escapes applied, `raw` is the text between the quotes as
    /// written (what a regex sees).
    Str {
        cooked: Result<String, ExprErrorKind>,
        raw: String,
    },
    /// `$name`.
    List(String),
    LParen,
    RParen,
    LBrace,
    RBrace,
    LBracket,
    RBracket,
    Star,
    EqEq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    Tilde,
    Bang,
    AndAnd,
    OrOr,
    XorXor,
    Eof,
}

impl Tok {
    /// How the token reads in an error message.
    pub(crate) fn describe(&self) -> String {
        match self {
            Tok::Word(w) => format!("\"{}\"", shorten(w)),
            Tok::Str { raw, .. } => format!("string \"{}\"", shorten(raw)),
            Tok::List(l) => format!("list \"${l}\""),
            Tok::Eof => "end of expression".to_string(),
            other => format!("\"{}\"", other.symbol()),
        }
    }

    fn symbol(&self) -> &'static str {
        match self {
            Tok::LParen => "(",
            Tok::RParen => ")",
            Tok::LBrace => "{",
            Tok::RBrace => "}",
            Tok::LBracket => "[",
            Tok::RBracket => "]",
            Tok::Star => "*",
            Tok::EqEq => "==",
            Tok::Ne => "!=",
            Tok::Lt => "<",
            Tok::Le => "<=",
            Tok::Gt => ">",
            Tok::Ge => ">=",
            Tok::Tilde => "~",
            Tok::Bang => "!",
            Tok::AndAnd => "&&",
            Tok::OrOr => "||",
            Tok::XorXor => "^^",
            _ => "",
        }
    }
}

/// Long tokens are cut in messages so one error stays one line.
fn shorten(s: &str) -> String {
    const MAX: usize = 40;
    if s.chars().count() <= MAX {
        s.to_string()
    } else {
        s.chars().take(MAX).chain("...".chars()).collect()
    }
}

fn is_word_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '/' | '-')
}

struct Cursor<'a> {
    chars: std::iter::Peekable<std::str::Chars<'a>>,
    pos: Pos,
}

impl Cursor<'_> {
    fn peek(&mut self) -> Option<char> {
        self.chars.peek().copied()
    }
    fn bump(&mut self) -> Option<char> {
        let c = self.chars.next()?;
        if c == '\n' {
            self.pos.line += 1;
            self.pos.column = 1;
        } else {
            self.pos.column += 1;
        }
        Some(c)
    }
}

/// Splits `src` into tokens with their positions; the last token is `Eof`.
pub(crate) fn tokenize(src: &str) -> Result<Vec<(Tok, Pos)>, ExprError> {
    let mut cur = Cursor {
        chars: src.chars().peekable(),
        pos: Pos { line: 1, column: 1 },
    };
    let mut out = Vec::new();
    loop {
        while cur.peek().is_some_and(char::is_whitespace) {
            cur.bump();
        }
        let start = cur.pos;
        let Some(c) = cur.bump() else {
            out.push((Tok::Eof, start));
            return Ok(out);
        };
        let two = |cur: &mut Cursor<'_>, next: char, yes: Tok, no: Option<Tok>| {
            if cur.peek() == Some(next) {
                cur.bump();
                Ok(yes)
            } else {
                // A lone `=`, `&`, `|` or `^` is almost always its doubled operator mistyped.
                no.ok_or(ExprError::new(
                    start,
                    ExprErrorKind::LoneOperator {
                        found: c,
                        meant: match c {
                            '=' => "==",
                            '&' => "&&",
                            '|' => "||",
                            _ => "^^",
                        },
                    },
                ))
            }
        };
        let tok = match c {
            '(' => Tok::LParen,
            ')' => Tok::RParen,
            '{' => Tok::LBrace,
            '}' => Tok::RBrace,
            '[' => Tok::LBracket,
            ']' => Tok::RBracket,
            '*' => Tok::Star,
            '~' => Tok::Tilde,
            '=' => two(&mut cur, '=', Tok::EqEq, None)?,
            '!' => two(&mut cur, '=', Tok::Ne, Some(Tok::Bang))?,
            '<' => two(&mut cur, '=', Tok::Le, Some(Tok::Lt))?,
            '>' => two(&mut cur, '=', Tok::Ge, Some(Tok::Gt))?,
            '&' => two(&mut cur, '&', Tok::AndAnd, None)?,
            '|' => two(&mut cur, '|', Tok::OrOr, None)?,
            '^' => two(&mut cur, '^', Tok::XorXor, None)?,
            '"' => quoted(&mut cur, start)?,
            'r' if matches!(cur.peek(), Some('"' | '#')) => raw_string(&mut cur, start)?,
            '$' => {
                let mut name = String::new();
                while let Some(c) = cur.peek().filter(|c| is_word_char(*c)) {
                    name.push(c);
                    cur.bump();
                }
                if name.is_empty() {
                    // Published examples show `$<LIST_UUID>` placeholders; say what belongs there.
                    return Err(ExprError::new(
                        start,
                        ExprErrorKind::Unexpected {
                            found: "\"$\"".to_string(),
                            expected: "a list name or UUID right after \"$\"",
                        },
                    ));
                }
                Tok::List(name)
            }
            c if is_word_char(c) => {
                let mut w = String::from(c);
                while let Some(c) = cur.peek().filter(|c| is_word_char(*c)) {
                    w.push(c);
                    cur.bump();
                }
                Tok::Word(w)
            }
            ',' => return Err(ExprError::new(start, ExprErrorKind::Comma)),
            '\'' => return Err(ExprError::new(start, ExprErrorKind::SingleQuote)),
            other => return Err(ExprError::new(start, ExprErrorKind::UnexpectedChar(other))),
        };
        out.push((tok, start));
    }
}

/// Lexes `"..."` after the opening quote.
fn quoted(cur: &mut Cursor<'_>, start: Pos) -> Result<Tok, ExprError> {
    let mut raw = String::new();
    let mut bytes: Vec<u8> = Vec::new();
    let mut bad: Option<ExprErrorKind> = None;
    loop {
        let Some(c) = cur.bump() else {
            return Err(ExprError::new(start, ExprErrorKind::UnterminatedString));
        };
        match c {
            '"' => break,
            '\\' => {
                let Some(e) = cur.bump() else {
                    return Err(ExprError::new(start, ExprErrorKind::UnterminatedString));
                };
                raw.push('\\');
                raw.push(e);
                match e {
                    '"' | '\\' => bytes.push(e as u8),
                    'x' => {
                        // Only hex digits, so a short `\x` never swallows the closing quote.
                        let mut hex = String::new();
                        while hex.len() < 2 {
                            match cur.peek().filter(char::is_ascii_hexdigit) {
                                Some(h) => {
                                    hex.push(h);
                                    cur.bump();
                                }
                                None => break,
                            }
                        }
                        raw.push_str(&hex);
                        match u8::from_str_radix(&hex, 16) {
                            Ok(b) if hex.len() == 2 => bytes.push(b),
                            _ => {
                                bad.get_or_insert(ExprErrorKind::BadEscape(format!("\\x{hex}")));
                            }
                        }
                    }
                    other => {
                        bad.get_or_insert(ExprErrorKind::BadEscape(format!("\\{other}")));
                    }
                }
            }
            c => {
                raw.push(c);
                let mut buf = [0u8; 4];
                bytes.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
    let cooked = match bad {
        Some(kind) => Err(kind),
        None => String::from_utf8(bytes).map_err(|_| ExprErrorKind::InvalidUtf8),
    };
    Ok(Tok::Str { cooked, raw })
}

/// Lexes `r"..."` / `r#"..."#` after the `r`.
fn raw_string(cur: &mut Cursor<'_>, start: Pos) -> Result<Tok, ExprError> {
    let mut hashes = 0usize;
    while cur.peek() == Some('#') {
        cur.bump();
        hashes += 1;
    }
    if cur.bump() != Some('"') {
        return Err(ExprError::new(start, ExprErrorKind::UnexpectedChar('r')));
    }
    let mut text = String::new();
    loop {
        let Some(c) = cur.bump() else {
            return Err(ExprError::new(start, ExprErrorKind::UnterminatedString));
        };
        if c == '"' {
            let mut seen = 0usize;
            while seen < hashes && cur.peek() == Some('#') {
                cur.bump();
                seen += 1;
            }
            if seen == hashes {
                break;
            }
            text.push('"');
            text.extend(std::iter::repeat_n('#', seen));
        } else {
            text.push(c);
        }
    }
    Ok(Tok::Str {
        cooked: Ok(text.clone()),
        raw: text,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(s: &str) -> Vec<Tok> {
        tokenize(s).unwrap().into_iter().map(|(t, _)| t).collect()
    }

    #[test]
    fn words_and_symbols() {
        assert_eq!(
            toks("net.dst.ip in {10.0.0.0/8 fe80::1}"),
            vec![
                Tok::Word("net.dst.ip".into()),
                Tok::Word("in".into()),
                Tok::LBrace,
                Tok::Word("10.0.0.0/8".into()),
                Tok::Word("fe80::1".into()),
                Tok::RBrace,
                Tok::Eof
            ]
        );
        assert_eq!(
            toks("!a&&b||c^^d"),
            vec![
                Tok::Bang,
                Tok::Word("a".into()),
                Tok::AndAnd,
                Tok::Word("b".into()),
                Tok::OrOr,
                Tok::Word("c".into()),
                Tok::XorXor,
                Tok::Word("d".into()),
                Tok::Eof
            ]
        );
    }

    #[test]
    fn strings() {
        let t = toks(r##""a\"b\\c\x41" r"x\y" r#"q"z"# "##);
        assert_eq!(
            t[0],
            Tok::Str {
                cooked: Ok("a\"b\\cA".into()),
                raw: r#"a\"b\\c\x41"#.into()
            }
        );
        assert_eq!(
            t[1],
            Tok::Str {
                cooked: Ok(r"x\y".into()),
                raw: r"x\y".into()
            }
        );
        assert_eq!(
            t[2],
            Tok::Str {
                cooked: Ok("q\"z".into()),
                raw: "q\"z".into()
            }
        );
        let bad = toks(r#""example\.com""#);
        assert!(
            matches!(&bad[0], Tok::Str { cooked: Err(ExprErrorKind::BadEscape(_)), raw } if raw == r"example\.com")
        );
    }

    #[test]
    fn positions() {
        let t = tokenize("a ==\n  \"x").unwrap_err();
        assert_eq!((t.pos.line, t.pos.column), (2, 3));
        let t = tokenize("a\n == b").unwrap();
        assert_eq!((t[1].1.line, t[1].1.column), (2, 2));
        assert_eq!(
            tokenize("a = b").unwrap_err().to_string(),
            "line 1, column 3: unexpected \"=\"; did you mean \"==\"?"
        );
        assert_eq!(
            tokenize("a & b").unwrap_err().kind,
            ExprErrorKind::LoneOperator {
                found: '&',
                meant: "&&"
            }
        );
        assert_eq!(
            tokenize("a in $<LIST_UUID>").unwrap_err().to_string(),
            "line 1, column 6: unexpected \"$\"; expected a list name or UUID right after \"$\""
        );
        assert_eq!(
            tokenize("a == 'b'").unwrap_err().kind,
            ExprErrorKind::SingleQuote
        );
    }
}
