//! The e-mails identity sends. Each goes to an address anyone may type, so nothing in it is the
//! registrant's text (a display name would make registration a relay for any words to any inbox).

use crate::mail::Email;

/// The welcome e-mail, with the code that confirms the address.
pub fn welcome(to: &str, code: &str) -> Email {
    Email {
        to: to.to_owned(),
        subject: "Welcome to keel".into(),
        body: format!(
            "Hello,\n\nyour keel account is ready. Sign in with {to}.\n\n{}\nIf you did not \
             register, you can ignore this message.\n",
            how_to_confirm(code)
        ),
    }
}

/// The e-mail to an address a user asked to change theirs to.
pub fn change(to: &str, code: &str) -> Email {
    Email {
        to: to.to_owned(),
        subject: "Confirm your new keel e-mail address".into(),
        body: format!(
            "Hello,\n\na keel account asked to use {to} as its e-mail address.\n\n{}\nIf it \
             was not you, ignore this message: nothing changes until the code is used.\n",
            how_to_confirm(code)
        ),
    }
}

fn how_to_confirm(code: &str) -> String {
    format!(
        "To confirm this address, send this code within a day:\n\n  {code}\n\n(REST: POST \
         /v1/users/me:confirmEmail with {{\"code\": \"{code}\"}}; gRPC: \
         keel.identity.v1.IdentityService/ConfirmEmail.)\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_letter_carries_its_code_on_a_line_of_its_own() {
        for letter in [welcome("a@x.io", "kec_abc"), change("a@x.io", "kec_abc")] {
            assert!(letter.body.lines().any(|line| line.trim() == "kec_abc"));
            assert_eq!(letter.to, "a@x.io");
        }
    }
}
