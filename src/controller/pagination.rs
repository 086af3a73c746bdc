//! List pagination for ListVolumes/ListSnapshots: entries sorted by id, the token is the
//! last id of the previous page, so a page stays correct while entries come and go.

use crate::error::Error;

/// One page of `items` (sorted by `key`) after `starting_token`, and the next token.
pub fn page<T>(
    mut items: Vec<T>,
    key: impl Fn(&T) -> &str,
    max_entries: i32,
    starting_token: &str,
    token_is_valid: impl Fn(&str) -> bool,
) -> Result<(Vec<T>, String), Error> {
    if max_entries < 0 {
        return Err(Error::InvalidField {
            field: "max_entries",
            reason: format!("must not be negative, got {max_entries}"),
        });
    }
    items.sort_by(|a, b| key(a).cmp(key(b)));
    if !starting_token.is_empty() {
        if !token_is_valid(starting_token) {
            return Err(Error::BadToken(starting_token.chars().take(64).collect()));
        }
        let start = items.partition_point(|i| key(i) <= starting_token);
        items.drain(..start);
    }
    let limit = if max_entries == 0 {
        usize::MAX
    } else {
        max_entries as usize
    };
    let next = if items.len() > limit {
        items.truncate(limit);
        items.last().map(|i| key(i).to_owned()).unwrap_or_default()
    } else {
        String::new()
    };
    Ok((items, next))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("id-{i:02}")).collect()
    }

    #[test]
    fn pages_cover_everything_once() {
        let mut seen = Vec::new();
        let mut token = String::new();
        loop {
            let (p, next) = page(ids(7), |s| s.as_str(), 3, &token, |_| true).unwrap();
            seen.extend(p);
            if next.is_empty() {
                break;
            }
            token = next;
        }
        assert_eq!(seen, ids(7));
    }

    #[test]
    fn zero_means_everything_and_bad_input_is_refused() {
        let (p, next) = page(ids(5), |s| s.as_str(), 0, "", |_| true).unwrap();
        assert_eq!((p.len(), next.as_str()), (5, ""));
        assert!(matches!(
            page(ids(5), |s| s.as_str(), -1, "", |_| true),
            Err(Error::InvalidField { .. })
        ));
        assert!(matches!(
            page(ids(5), |s| s.as_str(), 2, "junk", |_| false),
            Err(Error::BadToken(_))
        ));
    }

    #[test]
    fn a_deleted_token_entry_does_not_break_the_listing() {
        let mut items = ids(6);
        items.remove(2); // "id-02" was the last entry of the previous page
        let (p, _) = page(items, |s| s.as_str(), 0, "id-02", |_| true).unwrap();
        assert_eq!(p.first().unwrap(), "id-03");
    }
}
