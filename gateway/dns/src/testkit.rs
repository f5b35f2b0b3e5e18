//! Test kit of the resolver: the shared builders of `waygate-model`, and DNS queries.

use hickory_proto::op::{Message, MessageType, OpCode, Query};
use hickory_proto::rr::{Name, RecordType};
pub use waygate_model::testkit::*;

/// A recursive DNS query for `name` (ASCII, e.g. `"web.example."`).
pub fn dns_query(id: u16, name: &str, qtype: RecordType) -> Vec<u8> {
    let mut m = Message::new();
    m.set_id(id)
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(true)
        .add_query(Query::query(Name::from_ascii(name).expect("a name"), qtype));
    m.to_vec().expect("a query")
}
