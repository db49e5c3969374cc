//! Money as people read it: minor units shown with their currency's exponent (ISO 4217), so
//! that 2500 EUR minor units read `25.00 EUR` and 2500 JPY reads `2500 JPY`.

/// Whether `code` has the shape of an ISO 4217 code: three upper-case letters.
pub fn is_currency_code(code: &str) -> bool {
    code.len() == 3 && code.bytes().all(|b| b.is_ascii_uppercase())
}

/// How many digits follow the decimal point in `currency`: ISO 4217's minor unit. Two for
/// every currency but those listed.
pub fn exponent(currency: &str) -> u32 {
    match currency {
        "BIF" | "CLP" | "DJF" | "GNF" | "ISK" | "JPY" | "KMF" | "KRW" | "PYG" | "RWF" | "UGX"
        | "UYI" | "VND" | "VUV" | "XAF" | "XOF" | "XPF" => 0,
        "BHD" | "IQD" | "JOD" | "KWD" | "LYD" | "OMR" | "TND" => 3,
        "CLF" | "UYW" => 4,
        _ => 2,
    }
}

/// `units` minor units of `currency`, for a person: `25.00 EUR`, `-0.05 EUR`, `2500 JPY`.
pub fn for_people(units: i64, currency: &str) -> String {
    let digits = exponent(currency);
    let sign = if units < 0 { "-" } else { "" };
    let magnitude = units.unsigned_abs();
    if digits == 0 {
        return format!("{sign}{magnitude} {currency}");
    }
    let scale = 10u64.pow(digits);
    format!(
        "{sign}{}.{:0width$} {currency}",
        magnitude / scale,
        magnitude % scale,
        width = digits as usize
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minor_units_read_with_their_currencys_exponent() {
        assert_eq!(for_people(2500, "EUR"), "25.00 EUR");
        assert_eq!(for_people(5, "EUR"), "0.05 EUR");
        assert_eq!(for_people(-1999, "USD"), "-19.99 USD");
        assert_eq!(for_people(2500, "JPY"), "2500 JPY");
        assert_eq!(for_people(1234, "KWD"), "1.234 KWD");
        assert_eq!(for_people(i64::MIN, "EUR"), "-92233720368547758.08 EUR");
    }
}
