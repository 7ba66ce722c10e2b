//! Name patterns as operators write them: `*` any run of bytes (none included), `?` any one
//! byte, every other byte itself; no classes, no `**`. Used to choose the paths a file source
//! follows (one path component at a time) and the streams a receiver output takes.
//!
//! # Design constraints
//! - No recursion and no allocation: backtracking goes only to the last `*`, so a match costs
//!   at most O(pattern × name), whatever the pattern (a hostile `*a*a*a*b` included).

/// Whether `name` matches `pattern`.
pub fn matches(pattern: &[u8], name: &[u8]) -> bool {
    let (mut p, mut n) = (0, 0);
    // Where the last `*` was, and the name position it matches up to now.
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, n));
                p += 1;
            }
            Some(&c) if c == b'?' || c == name[n] => {
                p += 1;
                n += 1;
            }
            _ => match star {
                Some((sp, sn)) => {
                    star = Some((sp, sn + 1));
                    p = sp + 1;
                    n = sn + 1;
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_as_documented() {
        let yes = |p: &str, n: &str| matches(p.as_bytes(), n.as_bytes());
        assert!(yes("nginx_*", "nginx_access"));
        assert!(yes("nginx_*", "nginx_"));
        assert!(!yes("nginx_*", "nginx"));
        assert!(yes("*", ""));
        assert!(yes("a?c", "abc"));
        assert!(!yes("a?c", "ac"));
        assert!(yes("*_access*log", "nginx_access_error_log"));
        assert!(!yes("*_access*log", "nginx_access_error_lo"));
        assert!(yes("exact", "exact"));
        assert!(!yes("exact", "exact2"));
        assert!(yes("**a", "ba"));
        assert!(yes("*.log", "app.log"));
        assert!(yes("app.log*", "app.log"));
        assert!(yes("app.log*", "app.log.1"));
        assert!(yes("a?c*d", "abcxxd"));
        assert!(!yes("*.log", "app.log.1"));
    }

    #[test]
    fn a_hostile_pattern_stays_linear_in_practice() {
        let name = vec![b'a'; 4096];
        let pattern = b"*a*a*a*a*a*a*a*a*a*a*b";
        assert!(!matches(pattern, &name));
    }
}
