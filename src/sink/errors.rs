//! The one classification of database errors: is the database unavailable or busy
//! (retry the whole window later), or is the error about a record (isolate it)?
//!
//! Every caller asks [`classify`]; none re-derives the rule.

use tokio_postgres::error::SqlState;

/// What a database error says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The database cannot take the write now: connection or I/O failure, a timeout,
    /// resources exhausted, shutting down, a serialization failure or deadlock, a lock
    /// not available. The window is retried with backoff.
    Unavailable,
    /// The database refused something in the window's data (a constraint, a trigger's
    /// `RAISE`, row-level security, a deferred constraint at `COMMIT`, ...). The window is
    /// split until the failing records stand alone; each is quarantined.
    Record,
}

/// SQLSTATE classes (first two characters) that mean unavailable or busy.
const UNAVAILABLE_CLASSES: [&str; 4] = [
    "08", // connection exception
    "53", // insufficient resources (disk full, out of memory, too many connections)
    "58", // system error (I/O error)
    "XX", // internal error
];

/// Single SQLSTATEs outside those classes that mean unavailable or busy.
const UNAVAILABLE_CODES: [&str; 9] = [
    "40001", // serialization_failure
    "40P01", // deadlock_detected
    "55P03", // lock_not_available
    "57014", // query_canceled (statement_timeout)
    "57P01", // admin_shutdown
    "57P02", // crash_shutdown
    "57P03", // cannot_connect_now
    "57P04", // database_dropped
    "57P05", // idle_session_timeout
];

/// Classifies a SQLSTATE code.
pub fn classify_sqlstate(code: &str) -> ErrorClass {
    let unavailable = UNAVAILABLE_CODES.contains(&code)
        || code.get(..2).is_some_and(|class| UNAVAILABLE_CLASSES.contains(&class))
        || code.starts_with("57P");
    if unavailable {
        ErrorClass::Unavailable
    } else {
        ErrorClass::Record
    }
}

/// Classifies an error of tokio-postgres. An error without a SQLSTATE did not come from
/// the server's verdict on the data (I/O, a closed connection, a protocol failure): unavailable.
pub fn classify(err: &tokio_postgres::Error) -> ErrorClass {
    match err.code() {
        Some(code) => classify_sqlstate(code.code()),
        None => ErrorClass::Unavailable,
    }
}

/// The SQLSTATE of an error, for quarantine records and logs.
pub fn sqlstate(err: &tokio_postgres::Error) -> &str {
    err.code().map(SqlState::code).unwrap_or("none")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unavailable_or_busy_codes_retry() {
        for code in [
            "08000", "08003", "08006", "08001", "08004", "53000", "53100", "53200", "53300", "58030", "XX000", "40001",
            "40P01", "55P03", "57014", "57P01", "57P02", "57P03", "57P04", "57P05",
        ] {
            assert_eq!(classify_sqlstate(code), ErrorClass::Unavailable, "{code}");
        }
    }

    #[test]
    fn everything_else_is_about_a_record() {
        for code in [
            "22001", // string_data_right_truncation
            "22P02", // invalid_text_representation
            "23505", // unique_violation
            "23514", // check_violation
            "23503", // foreign_key_violation (a deferred one fails at COMMIT)
            "P0001", // raise_exception (a trigger's RAISE)
            "42501", // insufficient_privilege (row-level security)
            "44000", // with_check_option_violation
            "2BP01", // dependent_objects_still_exist
            "55000", // object_not_in_prerequisite_state
            "40002", // transaction_integrity_constraint_violation
            "",      // no code at all from the server
        ] {
            assert_eq!(classify_sqlstate(code), ErrorClass::Record, "{code:?}");
        }
    }
}
