//! Cloudflare's category tree: a rule naming a parent category also matches the subcategories.
//! Callers pass a domain's own category ids (inherited from its parent domain when it has none);
//! compiled rules expand parent ids, so evaluation needs no lookup.

/// Content categories: `(parent, subcategories)`, as Cloudflare numbers them.
pub static CONTENT_CATEGORIES: &[(i64, &[i64])] = &[
    (1, &[66]),
    (2, &[67, 125, 133]),
    (3, &[75, 89, 183, 185, 186]),
    (6, &[]),
    (7, &[100, 122, 164]),
    (8, &[99]),
    (9, &[]),
    (10, &[146]),
    (12, &[77, 126, 168]),
    (13, &[]),
    (15, &[115, 161]),
    (17, &[87, 102]),
    (18, &[]),
    (19, &[]),
    (20, &[]),
    (22, &[]),
    (24, &[84, 149, 181]),
    (25, &[]),
    (26, &[145, 184]),
    (27, &[]),
    (28, &[]),
    (29, &[166]),
    (30, &[]),
    (31, &[170]),
    (32, &[128, 169, 177]),
    (34, &[]),
];

/// Security categories: parent 21 (Security threats) and its subcategories.
pub static SECURITY_CATEGORIES: &[(i64, &[i64])] = &[(
    21,
    &[
        68, 80, 83, 117, 131, 134, 151, 153, 175, 176, 178, 187, 188, 191,
    ],
)];

/// The Child Abuse category, which the default DNS rule set blocks before anything else.
pub const CHILD_ABUSE: i64 = 170;

/// The subcategories of `id` (empty when it is not a parent).
pub fn subcategories(id: i64) -> &'static [i64] {
    CONTENT_CATEGORIES
        .iter()
        .chain(SECURITY_CATEGORIES)
        .find(|(p, _)| *p == id)
        .map(|(_, subs)| *subs)
        .unwrap_or(&[])
}

/// The parent of a subcategory, if it has one.
pub fn parent(id: i64) -> Option<i64> {
    CONTENT_CATEGORIES
        .iter()
        .chain(SECURITY_CATEGORIES)
        .find(|(_, subs)| subs.contains(&id))
        .map(|(p, _)| *p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tree() {
        assert_eq!(parent(133), Some(2));
        assert_eq!(parent(117), Some(21));
        assert_eq!(parent(2), None);
        assert!(subcategories(31).contains(&CHILD_ABUSE));
        assert!(subcategories(66).is_empty());
    }
}
