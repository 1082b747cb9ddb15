//! The one classification of database errors: did this record's values cause it, or is the
//! database in a condition where it cannot take this write now, for anyone?
//!
//! | class | SQLSTATEs | what the sink does |
//! |---|---|---|
//! | [`ErrorClass::Record`] | everything not below: data exceptions (22), constraints (23), a trigger's `RAISE` (P0001), a view's check option (44000), a row-level security policy refusing a row (42501 raised by the policy check) ... | the window is split until the failing records stand alone; each is quarantined as `db_rejected` and the rest commits |
//! | [`ErrorClass::Busy`] | 40001, 40003, 40P01, 55P03, 57014 (and a write that outlasts its deadline) | the whole window is retried with backoff; a record that keeps causing it while the database takes writes is, after bounded attempts, released for the redrive policy |
//! | [`ErrorClass::Unavailable`] | 08, 53, 58, XX, 57P, 3D000, 3F000 (down, out of resources, shutting down, gone); class 25 (read-only, ...), 42501 (privilege), 42P01 / 42703 (a table or column gone): it refuses writes; any error without a SQLSTATE (I/O, closed connection) | the window is held: retried with backoff for as long as it lasts, `/readyz` not ready, nothing quarantined, nothing released |
//!
//! Every caller asks [`classify`]; none re-derives the rule.

use tokio_postgres::error::SqlState;

/// What a database error says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The database refused something in the record's values. Costs only that record.
    Record,
    /// Contention: a serialization failure, a deadlock, a lock not available, a statement
    /// cancelled by its timeout. Retried; a record that provokes it every time (a trigger) is
    /// released after bounded attempts.
    Busy,
    /// The database cannot take this write now, for anyone: down, out of resources, or
    /// refusing writes (read-only, a privilege revoked, a table or column gone). Held.
    Unavailable,
}

impl ErrorClass {
    /// Whether the whole window is retried (not split record by record).
    pub fn retries_window(self) -> bool {
        self != ErrorClass::Record
    }
}

/// SQLSTATE classes (first two characters) of a database that cannot take writes now.
const UNAVAILABLE_CLASSES: [&str; 6] = [
    "08", // connection exception
    "25", // invalid transaction state: 25006 read_only_sql_transaction (a demoted primary, a standby)
    "53", // insufficient resources (disk full, out of memory, too many connections)
    "57", // operator intervention: admin or crash shutdown, cannot connect now, database dropped
    "58", // system error (I/O error)
    "XX", // internal error
];

/// Single SQLSTATEs of a database that cannot take writes now: the schema or privileges changed under the sink.
const UNAVAILABLE_CODES: [&str; 5] = [
    "42501", // insufficient_privilege (INSERT revoked)
    "42P01", // undefined_table (renamed or dropped)
    "42703", // undefined_column
    "3D000", // invalid_catalog_name (database gone)
    "3F000", // invalid_schema_name
];

/// Contention, which a single record can provoke too (a trigger raising it).
const BUSY_CODES: [&str; 5] = [
    "40001", // serialization_failure
    "40003", // statement_completion_unknown: retried whole, which is idempotent
    "40P01", // deadlock_detected
    "55P03", // lock_not_available
    "57014", // query_canceled (statement_timeout); checked before class 57
];

/// Whether an "unavailable" code is one a trigger can raise for some rows only (a refusal:
/// read-only, privilege, a table or column gone), not a condition of the server itself
/// (connection, resources, shutdown, I/O, internal): only such a code, while the write probe
/// passes, can be a record's doing.
pub fn may_be_a_records(code: &str) -> bool {
    UNAVAILABLE_CODES.contains(&code) || code.starts_with("25")
}

/// Classifies a SQLSTATE code.
pub fn classify_sqlstate(code: &str) -> ErrorClass {
    if BUSY_CODES.contains(&code) {
        ErrorClass::Busy
    } else if UNAVAILABLE_CODES.contains(&code)
        || code.get(..2).is_some_and(|class| UNAVAILABLE_CLASSES.contains(&class))
    {
        ErrorClass::Unavailable
    } else {
        ErrorClass::Record
    }
}

/// Classifies an error of tokio-postgres. An error without a SQLSTATE did not come from
/// the server's verdict on the data (I/O, a closed connection, a protocol failure): unavailable.
/// Row-level security refusing a row shares `42501` with a revoked privilege; it is told apart
/// by the server routine that raised it (the check of a policy's `WITH CHECK`), and is the record's.
pub fn classify(err: &tokio_postgres::Error) -> ErrorClass {
    if let Some(db) = err.as_db_error() {
        if db.routine() == Some(ROW_CHECK_ROUTINE) {
            return ErrorClass::Record;
        }
    }
    match err.code() {
        Some(code) => classify_sqlstate(code.code()),
        None => ErrorClass::Unavailable,
    }
}

/// The executor routine that raises a row-level security policy's or a view's `WITH CHECK` failure.
const ROW_CHECK_ROUTINE: &str = "ExecWithCheckOptions";

/// The SQLSTATE of an error, for quarantine records and logs.
pub fn sqlstate(err: &tokio_postgres::Error) -> &str {
    err.code().map(SqlState::code).unwrap_or("none")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_database_that_cannot_take_writes_is_unavailable() {
        for code in [
            "08000", "08003", "08006", "08001", "08004", "53000", "53100", "53200", "53300", "58030", "XX000", "57P01",
            "57P02", "57P03", "57P04", "57P05", "25006", "25001", "25P02", "42501", "42P01", "42703", "3D000", "3F000",
        ] {
            assert_eq!(classify_sqlstate(code), ErrorClass::Unavailable, "{code}");
        }
    }

    #[test]
    fn only_refusals_a_trigger_can_raise_may_be_a_records() {
        for code in ["25006", "42501", "42P01", "42703"] {
            assert!(may_be_a_records(code), "{code}");
        }
        for code in ["53100", "08006", "57P01", "58030", "XX000", "none"] {
            assert!(!may_be_a_records(code), "{code}");
        }
    }

    #[test]
    fn contention_is_busy() {
        for code in ["40001", "40003", "40P01", "55P03", "57014"] {
            assert_eq!(classify_sqlstate(code), ErrorClass::Busy, "{code}");
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
