//! Typed views over DNS wire bytes for the resolver's fast path: the common query (one question,
//! at most an OPT record) is read and answered without building a message object, and answers
//! already sent once are replayed from their bytes with the TTLs aged.
//!
//! Anything unusual (compression in the question, escaped label bytes, other sections, EDNS
//! versions we do not speak) is left to the full parser: [`QueryView::parse`] returns `None`.

use std::time::Instant;

/// Bytes of the fixed header.
pub const HEADER_LEN: usize = 12;
/// Longest name in wire form (RFC 1035 3.1).
const MAX_NAME: usize = 255;
/// Record type of OPT (RFC 6891).
const OPT: u16 = 41;
/// Record class IN.
const CLASS_IN: u16 = 1;

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

/// A query's name as lowercase text without the trailing dot, kept on the stack.
pub struct NameText {
    buf: [u8; MAX_NAME],
    len: usize,
}

impl Default for NameText {
    fn default() -> Self {
        NameText {
            buf: [0; MAX_NAME],
            len: 0,
        }
    }
}

impl NameText {
    /// The text (`""` for the root).
    pub fn as_str(&self) -> &str {
        // Only ASCII letters, digits, '-', '_', '*' and '.' are ever stored.
        std::str::from_utf8(&self.buf[..self.len]).unwrap_or("")
    }
}

/// A plain query, validated: header, one IN question, optionally one OPT record, nothing else.
#[derive(Debug, Clone, Copy)]
pub struct QueryView<'a> {
    bytes: &'a [u8],
    question_end: usize,
    /// The question's type.
    pub qtype: u16,
    /// The client's EDNS payload size, when it sent an OPT record.
    pub edns_payload: Option<u16>,
}

impl<'a> QueryView<'a> {
    /// Reads `bytes` as a plain query, writing its lowercase name into `name`.
    pub fn parse(bytes: &'a [u8], name: &mut NameText) -> Option<QueryView<'a>> {
        let flags = u16_at(bytes, 2)?;
        // A query (QR 0), opcode QUERY, no response code.
        if flags & 0xf80f != 0 {
            return None;
        }
        let counts = (
            u16_at(bytes, 4)?,
            u16_at(bytes, 6)?,
            u16_at(bytes, 8)?,
            u16_at(bytes, 10)?,
        );
        let additional = match counts {
            (1, 0, 0, n @ (0 | 1)) => n,
            _ => return None,
        };
        let mut at = HEADER_LEN;
        name.len = 0;
        loop {
            let len = usize::from(*bytes.get(at)?);
            at += 1;
            if len == 0 {
                break;
            }
            // 0xC0 and up: a compression pointer, which a question has no reason to use.
            if len > 63 || at + len > bytes.len() || at - HEADER_LEN + len >= MAX_NAME {
                return None;
            }
            if name.len > 0 {
                name.buf[name.len] = b'.';
                name.len += 1;
            }
            for &b in &bytes[at..at + len] {
                let b = b.to_ascii_lowercase();
                if !(b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'*') {
                    return None;
                }
                name.buf[name.len] = b;
                name.len += 1;
            }
            at += len;
        }
        let qtype = u16_at(bytes, at)?;
        if u16_at(bytes, at + 2)? != CLASS_IN {
            return None;
        }
        let question_end = at + 4;
        let mut edns_payload = None;
        let mut end = question_end;
        if additional == 1 {
            // Root owner, type OPT, class = payload size, TTL = extended rcode/version/flags.
            if *bytes.get(end)? != 0 || u16_at(bytes, end + 1)? != OPT {
                return None;
            }
            let payload = u16_at(bytes, end + 3)?;
            // Version 0 only; others get BADVERS from the full path.
            if *bytes.get(end + 6)? != 0 {
                return None;
            }
            let rdlen = usize::from(u16_at(bytes, end + 9)?);
            end += 11 + rdlen;
            edns_payload = Some(payload);
        }
        if end != bytes.len() {
            return None;
        }
        Some(QueryView {
            bytes,
            question_end,
            qtype,
            edns_payload,
        })
    }

    /// The query id.
    pub fn id(&self) -> u16 {
        u16::from_be_bytes([self.bytes[0], self.bytes[1]])
    }

    /// Whether the client asked for recursion.
    pub fn recursion_desired(&self) -> bool {
        self.bytes[2] & 0x01 != 0
    }

    /// The question section as sent (the client's letter case, which it may check).
    pub fn question(&self) -> &'a [u8] {
        &self.bytes[HEADER_LEN..self.question_end]
    }

    /// Writes the response header and the question; `answers`/`authority` are the counts of
    /// the records the caller appends, followed by [`QueryView::finish`].
    pub fn start_response(&self, rcode: u8, answers: u16, authority: u16, out: &mut Vec<u8>) {
        out.clear();
        out.extend_from_slice(&self.bytes[..2]);
        let rd = u8::from(self.recursion_desired());
        // QR, opcode QUERY, RD copied; RA set; the response code.
        out.push(0x80 | rd);
        out.push(0x80 | (rcode & 0x0f));
        out.extend_from_slice(&1u16.to_be_bytes());
        out.extend_from_slice(&answers.to_be_bytes());
        out.extend_from_slice(&authority.to_be_bytes());
        let additional = u16::from(self.edns_payload.is_some());
        out.extend_from_slice(&additional.to_be_bytes());
        out.extend_from_slice(self.question());
    }

    /// Appends the OPT record when the client sent one (advertising `payload`).
    pub fn finish(&self, payload: u16, out: &mut Vec<u8>) {
        if self.edns_payload.is_some() {
            out.push(0);
            out.extend_from_slice(&OPT.to_be_bytes());
            out.extend_from_slice(&payload.to_be_bytes());
            out.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        }
    }
}

/// Appends a record owned by the question's name (a pointer to offset 12).
pub fn push_record(rtype: u16, ttl: u32, rdata: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&[0xc0, HEADER_LEN as u8]);
    out.extend_from_slice(&rtype.to_be_bytes());
    out.extend_from_slice(&CLASS_IN.to_be_bytes());
    out.extend_from_slice(&ttl.to_be_bytes());
    let len = u16::try_from(rdata.len()).unwrap_or(0);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&rdata[..usize::from(len)]);
}

/// Skips a (possibly compressed) name starting at `at`; returns the offset after it.
fn skip_name(b: &[u8], mut at: usize) -> Option<usize> {
    loop {
        let len = *b.get(at)?;
        match len {
            0 => return Some(at + 1),
            l if l & 0xc0 == 0xc0 => return Some(at + 2),
            l if l <= 63 => at += 1 + usize::from(l),
            _ => return None,
        }
    }
}

/// An answer as sent once, replayable to later askers of the same question.
#[derive(Debug, Clone)]
pub struct WireAnswer {
    rcode: u8,
    answers: u16,
    authority: u16,
    /// The answer and authority sections (offsets inside assume the same question length).
    records: Box<[u8]>,
    /// Where each record's TTL sits in `records`.
    ttls: Box<[u16]>,
    sent: Instant,
}

impl WireAnswer {
    /// Captures the records of `response` (a message we emitted at `sent`, not truncated);
    /// `None` if it does not have the expected shape.
    pub fn capture(response: &[u8], sent: Instant) -> Option<WireAnswer> {
        let flags = u16_at(response, 2)?;
        if flags & 0x0200 != 0 || u16_at(response, 4)? != 1 {
            return None;
        }
        let answers = u16_at(response, 6)?;
        let authority = u16_at(response, 8)?;
        let start = skip_name(response, HEADER_LEN)? + 4;
        let mut at = start;
        // Summed as usize: two u16 counts of a malformed message may overflow u16.
        let records = usize::from(answers) + usize::from(authority);
        let mut ttls = Vec::with_capacity(records);
        for _ in 0..records {
            at = skip_name(response, at)?;
            let ttl_at = at + 4;
            let rdlen = usize::from(u16_at(response, at + 8)?);
            at += 10 + rdlen;
            if at > response.len() {
                return None;
            }
            ttls.push(u16::try_from(ttl_at - start).ok()?);
        }
        Some(WireAnswer {
            rcode: (flags & 0x0f) as u8,
            answers,
            authority,
            records: response.get(start..at)?.into(),
            ttls: ttls.into(),
            sent,
        })
    }

    /// Seconds since it was sent (what every TTL loses).
    pub fn age(&self, now: Instant) -> u32 {
        u32::try_from(now.saturating_duration_since(self.sent).as_secs()).unwrap_or(u32::MAX)
    }

    /// Writes the answer to `query` at `now` into `out`.
    pub fn replay(&self, query: &QueryView<'_>, payload: u16, now: Instant, out: &mut Vec<u8>) {
        query.start_response(self.rcode, self.answers, self.authority, out);
        let base = out.len();
        out.extend_from_slice(&self.records);
        let age = self.age(now);
        for &t in self.ttls.iter() {
            let at = base + usize::from(t);
            if let Some(field) = out.get_mut(at..at + 4) {
                let ttl = u32::from_be_bytes([field[0], field[1], field[2], field[3]]);
                field.copy_from_slice(&ttl.saturating_sub(age).to_be_bytes());
            }
        }
        query.finish(payload, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
    use hickory_proto::rr::{Name, RData, Record, RecordType};
    use std::time::Duration;

    fn query(name: &str, edns: bool) -> Vec<u8> {
        let mut m = Message::new();
        m.set_id(0x1234)
            .set_message_type(MessageType::Query)
            .set_op_code(OpCode::Query)
            .set_recursion_desired(true)
            .add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
        if edns {
            let mut e = Edns::new();
            e.set_max_payload(1400);
            m.set_edns(e);
        }
        m.to_vec().unwrap()
    }

    #[test]
    fn plain_queries_are_read_and_odd_ones_left_alone() {
        let mut name = NameText::default();
        let q = query("WWW.Example.COM.", true);
        let view = QueryView::parse(&q, &mut name).unwrap();
        assert_eq!(name.as_str(), "www.example.com");
        assert_eq!(
            (view.id(), view.qtype, view.edns_payload),
            (0x1234, 1, Some(1400))
        );
        assert!(view.recursion_desired());
        let q = query("a.example.", false);
        assert_eq!(QueryView::parse(&q, &mut name).unwrap().edns_payload, None);
        // A response, trailing bytes, a label with a space, truncation: not for the fast path.
        let mut response = q.clone();
        response[2] |= 0x80;
        assert!(QueryView::parse(&response, &mut name).is_none());
        let mut trailing = q.clone();
        trailing.push(0);
        assert!(QueryView::parse(&trailing, &mut name).is_none());
        let mut odd = query("axb.example.", false);
        let x = odd.iter().position(|&b| b == b'x').unwrap();
        odd[x] = b' ';
        assert!(QueryView::parse(&odd, &mut name).is_none());
        for n in 0..q.len() {
            let _ = QueryView::parse(&q[..n], &mut name);
        }
    }

    proptest::proptest! {
        /// Long and odd names (labels of any length and bytes, up to the wire limit and past
        /// it) never overflow the text buffer, and whatever parses reads back as the full
        /// parser reads it.
        #[test]
        fn names_of_any_shape_parse_safely(
            labels in proptest::collection::vec(
                proptest::collection::vec(proptest::prelude::any::<u8>(), 0..70), 0..12),
            ascii in proptest::prelude::any::<bool>(),
        ) {
            let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
            for label in &labels {
                let label: Vec<u8> = if ascii {
                    label.iter().map(|b| b'a' + b % 26).collect()
                } else {
                    label.clone()
                };
                q.push(label.len() as u8);
                q.extend_from_slice(&label);
            }
            q.extend_from_slice(&[0, 0, 1, 0, 1]);
            let mut name = NameText::default();
            if let Some(view) = QueryView::parse(&q, &mut name) {
                let full = Message::from_vec(&q).unwrap();
                let expected = full.queries()[0].name().to_lowercase().to_ascii();
                proptest::prop_assert_eq!(format!("{}.", name.as_str()), expected);
                proptest::prop_assert_eq!(view.qtype, 1);
            }
        }
    }

    #[test]
    fn local_answers_match_what_the_full_parser_reads() {
        let mut name = NameText::default();
        let q = query("Blocked.Example.", true);
        let view = QueryView::parse(&q, &mut name).unwrap();
        let mut out = Vec::new();
        view.start_response(0, 1, 0, &mut out);
        push_record(1, 10, &[0, 0, 0, 0], &mut out);
        view.finish(1232, &mut out);
        let m = Message::from_vec(&out).unwrap();
        assert_eq!(m.id(), 0x1234);
        assert_eq!(m.message_type(), MessageType::Response);
        assert!(m.recursion_available() && m.recursion_desired());
        assert_eq!(m.queries()[0].name().to_ascii(), "Blocked.Example.");
        assert_eq!(m.answers()[0].data(), &RData::A("0.0.0.0".parse().unwrap()));
        assert_eq!(m.extensions().as_ref().unwrap().max_payload(), 1232);
    }

    #[test]
    fn counts_summing_past_u16_are_refused_not_overflowed() {
        // Found by the dns fuzz target: 0xffff answers and 1 authority record, nothing after.
        let mut response = vec![0u8; HEADER_LEN];
        response[2] = 0x80;
        response[5] = 1;
        response[6..10].copy_from_slice(&[0xff, 0xff, 0, 1]);
        response.extend_from_slice(&[0, 0, 1, 0, 1]);
        assert!(WireAnswer::capture(&response, crate::test_epoch()).is_none());
    }

    #[test]
    fn a_replayed_answer_ages_its_ttls_and_takes_the_new_question() {
        let t0 = crate::test_epoch();
        let mut m = Message::new();
        let owner = Name::from_ascii("a.example.").unwrap();
        m.set_id(1)
            .set_message_type(MessageType::Response)
            .set_response_code(ResponseCode::NoError)
            .add_query(Query::query(owner.clone(), RecordType::A));
        m.add_answer(Record::from_rdata(
            owner.clone(),
            300,
            RData::A("203.0.113.10".parse().unwrap()),
        ));
        m.add_answer(Record::from_rdata(
            owner,
            60,
            RData::A("203.0.113.11".parse().unwrap()),
        ));
        let bytes = m.to_vec().unwrap();
        let cached = WireAnswer::capture(&bytes, t0).unwrap();

        let mut name = NameText::default();
        let q = query("A.EXAMPLE.", false);
        let view = QueryView::parse(&q, &mut name).unwrap();
        let mut out = Vec::new();
        cached.replay(&view, 1232, t0 + Duration::from_secs(20), &mut out);
        let r = Message::from_vec(&out).unwrap();
        assert_eq!(r.id(), 0x1234);
        assert_eq!(r.queries()[0].name().to_ascii(), "A.EXAMPLE.");
        let ttls: Vec<u32> = r.answers().iter().map(|a| a.ttl()).collect();
        assert_eq!(ttls, vec![280, 40]);
    }
}
