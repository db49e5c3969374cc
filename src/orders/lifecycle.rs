//! What an order is in its life, as types: its state (what the buyer sees), its stage (what the
//! saga still has to do), and the steps of its history. Each is stored as text and read back
//! strictly: a row that holds anything else is corrupt, and says so, rather than quietly
//! meaning something.

use std::fmt;

/// What the buyer sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrderState {
    /// Placed; the saga is working on it.
    Pending,
    /// Stock sold, wallet charged, confirmation e-mail queued.
    Confirmed,
    /// Not fulfilled; the reason says why, and nothing is held.
    Rejected,
    /// Refunded and stock released.
    Cancelled,
}

/// Where an order's saga is: what it still has to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Reserve the stock.
    Reserve,
    /// Charge the wallet.
    Charge,
    /// Make the reservation final, then confirm.
    Commit,
    /// Rejected (decided, reason recorded): refund whatever was charged, release whatever was
    /// reserved, then settle REJECTED.
    Reject,
    /// Cancelled by the buyer (decided): refund, release, then settle CANCELLED.
    Cancel,
    /// Nothing left to do.
    Done,
}

/// A stored value that is none of its type's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("corrupt order row: {what} {value:?}")]
pub struct Corrupt {
    /// Which column.
    pub what: &'static str,
    /// What it held.
    pub value: String,
}

/// Text stored for an enum, and read back strictly.
macro_rules! stored {
    ($type:ident, $what:literal, { $($variant:ident => $text:literal),+ $(,)? }) => {
        impl $type {
            /// As stored.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($type::$variant => $text),+
                }
            }

            /// From its stored text; anything else is corrupt.
            pub fn parse(s: &str) -> Result<Self, Corrupt> {
                match s {
                    $($text => Ok($type::$variant),)+
                    _ => Err(Corrupt { what: $what, value: s.to_owned() }),
                }
            }
        }

        impl fmt::Display for $type {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

stored!(OrderState, "state", {
    Pending => "PENDING",
    Confirmed => "CONFIRMED",
    Rejected => "REJECTED",
    Cancelled => "CANCELLED",
});

stored!(Stage, "stage", {
    Reserve => "reserve",
    Charge => "charge",
    Commit => "commit",
    Reject => "reject",
    Cancel => "cancel",
    Done => "done",
});

impl Stage {
    /// The saga job's phase that drives this stage: a cancellation has a job of its own.
    pub fn phase(self) -> &'static str {
        match self {
            Stage::Cancel => "cancel",
            _ => "place",
        }
    }
}

/// What a history step did: the proto's `SagaStep.Action`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// The order was placed.
    Place,
    /// Stock was reserved.
    ReserveStock,
    /// The wallet was charged.
    Charge,
    /// The reservation was made final.
    CommitReservation,
    /// Stock went back to the shelf.
    ReleaseStock,
    /// The charge was refunded.
    Refund,
    /// The order was confirmed.
    Confirm,
    /// The order was rejected.
    Reject,
    /// The buyer asked to cancel it.
    Cancel,
}

stored!(Action, "history action", {
    Place => "PLACE",
    ReserveStock => "RESERVE_STOCK",
    Charge => "CHARGE",
    CommitReservation => "COMMIT_RESERVATION",
    ReleaseStock => "RELEASE_STOCK",
    Refund => "REFUND",
    Confirm => "CONFIRM",
    Reject => "REJECT",
    Cancel => "CANCEL",
});

/// How a history step ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// It was done.
    Done,
    /// It was refused.
    Refused,
}

stored!(Outcome, "history outcome", {
    Done => "DONE",
    Refused => "REFUSED",
});

/// A history step to record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// What it did.
    pub action: Action,
    /// How it ended.
    pub outcome: Outcome,
    /// Why it was refused, or what it undid.
    pub detail: String,
    /// Whether it undid an earlier step.
    pub compensation: bool,
}

impl Step {
    /// `action` done.
    pub fn done(action: Action) -> Self {
        Self {
            action,
            outcome: Outcome::Done,
            detail: String::new(),
            compensation: false,
        }
    }

    /// `action` refused, because of `detail`.
    pub fn refused(action: Action, detail: impl Into<String>) -> Self {
        Self {
            action,
            outcome: Outcome::Refused,
            detail: detail.into(),
            compensation: false,
        }
    }

    /// `action` done to undo an earlier step, as `detail` says.
    pub fn compensation(action: Action, detail: impl Into<String>) -> Self {
        Self {
            action,
            outcome: Outcome::Done,
            detail: detail.into(),
            compensation: true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_text_round_trips_and_anything_else_is_corrupt() {
        for stage in [
            Stage::Reserve,
            Stage::Charge,
            Stage::Commit,
            Stage::Reject,
            Stage::Cancel,
            Stage::Done,
        ] {
            assert_eq!(Stage::parse(stage.as_str()), Ok(stage));
        }
        for state in [
            OrderState::Pending,
            OrderState::Confirmed,
            OrderState::Rejected,
            OrderState::Cancelled,
        ] {
            assert_eq!(OrderState::parse(state.as_str()), Ok(state));
        }
        assert_eq!(
            Stage::parse("dnoe"),
            Err(Corrupt {
                what: "stage",
                value: "dnoe".into()
            })
        );
        assert!(OrderState::parse("pending").is_err());
        assert!(Action::parse("").is_err());
    }
}
