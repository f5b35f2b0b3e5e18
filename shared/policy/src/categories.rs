//! Cloudflare's category tree: a rule naming a parent category also matches the subcategories.
//! Callers pass a domain's own category ids (inherited from its parent domain when it has none);
//! compiled rules expand parent ids, so evaluation needs no lookup.

/// Content categories: `(parent, subcategories)`, as Cloudflare numbers them.
pub static CONTENT_CATEGORIES: &[(i64, &[i64])] = &[
    (1, &[66]),
    (2, &[67, 125, 133]),
    (3, &[75, 89, 183, 185, 186]),
    (6, &[90, 91, 144, 150, 189]),
    (
        7,
        &[
            70, 74, 76, 79, 92, 96, 100, 106, 107, 116, 120, 121, 122, 127, 139, 156, 164,
        ],
    ),
    (8, &[99]),
    (9, &[101, 137, 190]),
    (10, &[103, 146]),
    (12, &[77, 98, 108, 110, 111, 118, 126, 129, 168, 172]),
    (13, &[113]),
    (15, &[115, 119, 124, 141, 161]),
    (17, &[85, 87, 102, 135, 138, 157, 162]),
    (18, &[140]),
    (19, &[142]),
    (20, &[143]),
    (22, &[73, 82, 88, 148]),
    (
        24,
        &[
            71, 72, 78, 84, 86, 93, 94, 97, 104, 105, 114, 130, 132, 136, 147, 149, 154, 158, 173,
            174, 181,
        ],
    ),
    (25, &[152]),
    (
        26,
        &[69, 81, 95, 109, 123, 145, 155, 159, 184, 192, 193, 194],
    ),
    (27, &[160]),
    (28, &[163]),
    (29, &[165, 166]),
    (30, &[167]),
    (31, &[170]),
    (32, &[128, 169, 177]),
    (34, &[182]),
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
        // Gaming sits under Entertainment; Search Engines under Technology; CIPA Filter under CIPA.
        assert_eq!(parent(100), Some(7));
        assert_eq!(parent(145), Some(26));
        assert_eq!(parent(182), Some(34));
        assert_eq!(subcategories(6), &[90, 91, 144, 150, 189]);
        // Every id appears once, as a parent or as one subcategory.
        let mut ids: Vec<i64> = CONTENT_CATEGORIES
            .iter()
            .chain(SECURITY_CATEGORIES)
            .flat_map(|(p, subs)| std::iter::once(*p).chain(subs.iter().copied()))
            .collect();
        let n = ids.len();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), n);
    }
}
