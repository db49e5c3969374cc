//! A position in PostgreSQL's write-ahead log, as a replica's progress and a consistency token.

use std::fmt;
use std::str::FromStr;

/// A WAL position (`pg_lsn`): how far a primary has written or a replica has replayed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(pub u64);

/// The size of a WAL page and of a segment (PostgreSQL's defaults).
const PAGE: u64 = 8192;
const SEGMENT: u64 = 16 * 1024 * 1024;
/// The headers at the start of a page and of a segment's first page.
const PAGE_HEADER: u64 = 24;
const SEGMENT_HEADER: u64 = 40;

impl Lsn {
    /// The first position.
    pub const ZERO: Lsn = Lsn(0);

    /// This insert position as the end of the records before it: where the next record would
    /// start after a page header, the end of the last one is the page boundary, which is what
    /// a replica reports once it replayed that record (`pg_current_wal_insert_lsn` points past
    /// the header; `pg_last_wal_replay_lsn` does not).
    #[must_use]
    pub fn settled(self) -> Lsn {
        if self.0 % SEGMENT == SEGMENT_HEADER {
            Lsn(self.0 - SEGMENT_HEADER)
        } else if self.0 % PAGE == PAGE_HEADER && self.0 % SEGMENT != PAGE_HEADER {
            Lsn(self.0 - PAGE_HEADER)
        } else {
            self
        }
    }

    /// How far this position is past `earlier`, in bytes.
    pub fn bytes_after(self, earlier: Lsn) -> u64 {
        self.0.saturating_sub(earlier.0)
    }

    /// The token form: sixteen hex digits, which order as the positions do.
    pub fn token(self) -> String {
        format!("{:016x}", self.0)
    }

    /// A token read back; `None` when it is not one.
    pub fn from_token(token: &str) -> Option<Lsn> {
        if token.len() != 16 {
            return None;
        }
        u64::from_str_radix(token, 16).ok().map(Lsn)
    }
}

/// PostgreSQL's text form: `16/B374D848`.
impl FromStr for Lsn {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (high, low) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not a WAL position"))?;
        let part = |p: &str| {
            u32::from_str_radix(p, 16).map_err(|_| format!("{s:?} is not a WAL position"))
        };
        Ok(Lsn((u64::from(part(high)?) << 32) | u64::from(part(low)?)))
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postgres_text_form_reads_and_writes_back() {
        let lsn: Lsn = "16/B374D848".parse().unwrap();
        assert_eq!(lsn.0, 0x16_B374_D848);
        assert_eq!(lsn.to_string(), "16/B374D848");
        assert!("16B374D848".parse::<Lsn>().is_err());
        assert!("16/zz".parse::<Lsn>().is_err());
    }

    #[test]
    fn tokens_order_as_the_positions_do_and_reject_anything_else() {
        let (a, b) = (Lsn(0x0fff), Lsn(0x1_0000_0000));
        assert!(a.token() < b.token());
        assert_eq!(Lsn::from_token(&b.token()), Some(b));
        assert_eq!(Lsn::from_token("12"), None);
        assert_eq!(Lsn::from_token("zzzzzzzzzzzzzzzz"), None);
    }

    #[test]
    fn an_insert_position_after_a_page_header_settles_on_the_page_boundary() {
        assert_eq!(Lsn(3 * PAGE + PAGE_HEADER).settled(), Lsn(3 * PAGE));
        assert_eq!(
            Lsn(2 * SEGMENT + SEGMENT_HEADER).settled(),
            Lsn(2 * SEGMENT)
        );
        assert_eq!(Lsn(3 * PAGE + 100).settled(), Lsn(3 * PAGE + 100));
        // A segment's first page has the long header only.
        assert_eq!(
            Lsn(2 * SEGMENT + PAGE_HEADER).settled(),
            Lsn(2 * SEGMENT + PAGE_HEADER)
        );
    }
}
