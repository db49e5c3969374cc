//! ListProducts' `filter` (`price >= 100 AND price <= 5000 AND in_stock = true`) and `order_by`
//! (`create_time`, `create_time desc`, `price`, `price desc`), parsed into a typed query.

use crate::input::FieldError;

/// What ListProducts selects.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProductFilter {
    /// Lowest price, inclusive, in minor units.
    pub min_price: Option<i64>,
    /// Highest price, inclusive, in minor units.
    pub max_price: Option<i64>,
    /// Only products with (or without) stock.
    pub in_stock: Option<bool>,
}

/// How ListProducts orders.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ProductOrder {
    /// Oldest first (the default).
    #[default]
    CreatedAsc,
    /// Newest first.
    CreatedDesc,
    /// Cheapest first, then oldest.
    PriceAsc,
    /// Dearest first, then newest.
    PriceDesc,
}

impl ProductFilter {
    /// Parses `raw`: terms joined by `AND`, each `price <op> <units>` (op one of `>=`, `<=`,
    /// `>`, `<`, `=`) or `in_stock = true|false`.
    pub fn parse(raw: &str) -> Result<Self, FieldError> {
        let mut filter = ProductFilter::default();
        if raw.trim().is_empty() {
            return Ok(filter);
        }
        for term in split_and(raw) {
            let (field, op, value) = split_term(term)?;
            match field {
                "price" => {
                    let units: i64 = value.parse().map_err(|_| {
                        FieldError::new(
                            "filter",
                            format!("price must be compared with whole minor units, not {value:?}"),
                        )
                    })?;
                    let (min, max) = match op {
                        ">=" => (Some(units), None),
                        ">" => (Some(units.saturating_add(1)), None),
                        "<=" => (None, Some(units)),
                        "<" => (None, Some(units.saturating_sub(1))),
                        _ => (Some(units), Some(units)),
                    };
                    if let Some(min) = min {
                        filter.min_price = Some(filter.min_price.map_or(min, |m| m.max(min)));
                    }
                    if let Some(max) = max {
                        filter.max_price = Some(filter.max_price.map_or(max, |m| m.min(max)));
                    }
                }
                "in_stock" if op == "=" => {
                    filter.in_stock = Some(match value {
                        "true" => true,
                        "false" => false,
                        _ => {
                            return Err(FieldError::new(
                                "filter",
                                "in_stock must be true or false",
                            ));
                        }
                    });
                }
                "in_stock" => return Err(FieldError::new("filter", "in_stock takes `=`")),
                other => {
                    return Err(FieldError::new(
                        "filter",
                        format!("unknown field {other:?}; filterable: price, in_stock"),
                    ));
                }
            }
        }
        Ok(filter)
    }

    /// A canonical spelling, for page-token fingerprints and cache keys.
    pub fn canonical(&self) -> String {
        format!(
            "{:?}|{:?}|{:?}",
            self.min_price, self.max_price, self.in_stock
        )
    }
}

impl ProductOrder {
    /// Parses `raw`: empty, `create_time [asc|desc]` or `price [asc|desc]`.
    pub fn parse(raw: &str) -> Result<Self, FieldError> {
        let words: Vec<&str> = raw.split_whitespace().collect();
        match words.as_slice() {
            [] | ["create_time"] | ["create_time", "asc"] => Ok(Self::CreatedAsc),
            ["create_time", "desc"] => Ok(Self::CreatedDesc),
            ["price"] | ["price", "asc"] => Ok(Self::PriceAsc),
            ["price", "desc"] => Ok(Self::PriceDesc),
            _ => Err(FieldError::new(
                "order_by",
                "supported: create_time, create_time desc, price, price desc",
            )),
        }
    }
}

fn split_and(raw: &str) -> Vec<&str> {
    let mut terms = Vec::new();
    let mut rest = raw;
    loop {
        let lower = rest.to_ascii_lowercase();
        match lower.find(" and ") {
            Some(at) => {
                terms.push(rest[..at].trim());
                rest = &rest[at + 5..];
            }
            None => {
                terms.push(rest.trim());
                return terms;
            }
        }
    }
}

fn split_term(term: &str) -> Result<(&str, &str, &str), FieldError> {
    for op in [">=", "<=", ">", "<", "="] {
        if let Some((field, value)) = term.split_once(op) {
            let (field, value) = (field.trim(), value.trim());
            if !field.is_empty() && !value.is_empty() {
                return Ok((field, op, value));
            }
        }
    }
    Err(FieldError::new(
        "filter",
        format!("cannot read the term {term:?}; try `price >= 100`"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn price_ranges_and_stock() {
        let f = ProductFilter::parse("price >= 100 AND price <= 5000 and in_stock = true").unwrap();
        assert_eq!(
            f,
            ProductFilter {
                min_price: Some(100),
                max_price: Some(5000),
                in_stock: Some(true)
            }
        );
        let f = ProductFilter::parse("price > 100 AND price < 200").unwrap();
        assert_eq!((f.min_price, f.max_price), (Some(101), Some(199)));
        assert_eq!(ProductFilter::parse("").unwrap(), ProductFilter::default());
    }

    #[test]
    fn nonsense_is_refused() {
        for bad in [
            "price",
            "price >= cheap",
            "colour = red",
            "in_stock > 1",
            "in_stock = maybe",
            "price >= 1 AND",
        ] {
            assert!(ProductFilter::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn orders() {
        assert_eq!(ProductOrder::parse("").unwrap(), ProductOrder::CreatedAsc);
        assert_eq!(
            ProductOrder::parse("price desc").unwrap(),
            ProductOrder::PriceDesc
        );
        assert_eq!(
            ProductOrder::parse(" create_time   desc ").unwrap(),
            ProductOrder::CreatedDesc
        );
        assert!(ProductOrder::parse("title").is_err());
        assert!(ProductOrder::parse("price sideways").is_err());
    }
}
