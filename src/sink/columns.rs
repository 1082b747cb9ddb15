//! The columns of `user_logins` loginflow writes, listed once: the COPY statement and its
//! binary types, the skipping `INSERT ... UNNEST` and each row's values all derive from
//! [`LOGIN_COLUMNS`].

use std::sync::LazyLock;

use chrono::{DateTime, NaiveDate, Utc};
use tokio_postgres::types::{ToSql, Type};

use crate::records::{MaskedLogin, TRANSFORM_VERSION};

/// One login's values, as the columns take them.
pub struct LoginRow<'a> {
    message_id: &'a str,
    user_id: &'a str,
    device_type: &'a str,
    masked_ip: &'a str,
    masked_device_id: &'a str,
    locale: Option<&'a str>,
    app_version: i32,
    app_version_text: &'a str,
    create_date: NaiveDate,
    sent_at: DateTime<Utc>,
    mask_key_id: &'a str,
    transform_version: &'static str,
}

impl<'a> LoginRow<'a> {
    pub fn of(login: &'a MaskedLogin) -> LoginRow<'a> {
        LoginRow {
            message_id: &login.message_id,
            user_id: &login.user_id,
            device_type: &login.device_type,
            masked_ip: &login.masked_ip,
            masked_device_id: &login.masked_device_id,
            locale: login.locale.as_deref(),
            app_version: login.app_version,
            app_version_text: &login.app_version_text,
            create_date: login.create_date(),
            sent_at: login.sent_at,
            mask_key_id: &login.mask_key_id,
            transform_version: TRANSFORM_VERSION,
        }
    }

    /// The row's values in [`LOGIN_COLUMNS`] order (a COPY row).
    pub fn values(&self) -> [&(dyn ToSql + Sync); LOGIN_COLUMN_COUNT] {
        LOGIN_COLUMNS.each_ref().map(|column| (column.value)(self))
    }
}

/// One column: its name, its type (binary COPY; the array of it for UNNEST), and how a row's
/// value and a window's array of them are read.
pub struct LoginColumn {
    pub name: &'static str,
    pub sql_type: Type,
    value: for<'r> fn(&'r LoginRow<'_>) -> &'r (dyn ToSql + Sync),
    array: for<'r> fn(&'r [LoginRow<'_>]) -> Box<dyn ToSql + Sync + Send + 'r>,
}

/// How many columns a login fills.
pub const LOGIN_COLUMN_COUNT: usize = 12;

/// Every column a login fills, in order.
pub static LOGIN_COLUMNS: [LoginColumn; LOGIN_COLUMN_COUNT] = [
    LoginColumn {
        name: "message_id",
        sql_type: Type::TEXT,
        value: |r| &r.message_id,
        array: |rs| texts(rs, |r| r.message_id),
    },
    LoginColumn {
        name: "user_id",
        sql_type: Type::VARCHAR,
        value: |r| &r.user_id,
        array: |rs| texts(rs, |r| r.user_id),
    },
    LoginColumn {
        name: "device_type",
        sql_type: Type::VARCHAR,
        value: |r| &r.device_type,
        array: |rs| texts(rs, |r| r.device_type),
    },
    LoginColumn {
        name: "masked_ip",
        sql_type: Type::VARCHAR,
        value: |r| &r.masked_ip,
        array: |rs| texts(rs, |r| r.masked_ip),
    },
    LoginColumn {
        name: "masked_device_id",
        sql_type: Type::VARCHAR,
        value: |r| &r.masked_device_id,
        array: |rs| texts(rs, |r| r.masked_device_id),
    },
    LoginColumn {
        name: "locale",
        sql_type: Type::VARCHAR,
        value: |r| &r.locale,
        array: |rs| Box::new(rs.iter().map(|r| r.locale).collect::<Vec<_>>()),
    },
    LoginColumn {
        name: "app_version",
        sql_type: Type::INT4,
        value: |r| &r.app_version,
        array: |rs| Box::new(rs.iter().map(|r| r.app_version).collect::<Vec<_>>()),
    },
    LoginColumn {
        name: "app_version_text",
        sql_type: Type::VARCHAR,
        value: |r| &r.app_version_text,
        array: |rs| texts(rs, |r| r.app_version_text),
    },
    LoginColumn {
        name: "create_date",
        sql_type: Type::DATE,
        value: |r| &r.create_date,
        array: |rs| Box::new(rs.iter().map(|r| r.create_date).collect::<Vec<_>>()),
    },
    LoginColumn {
        name: "sent_at",
        sql_type: Type::TIMESTAMPTZ,
        value: |r| &r.sent_at,
        array: |rs| Box::new(rs.iter().map(|r| r.sent_at).collect::<Vec<_>>()),
    },
    LoginColumn {
        name: "mask_key_id",
        sql_type: Type::TEXT,
        value: |r| &r.mask_key_id,
        array: |rs| texts(rs, |r| r.mask_key_id),
    },
    LoginColumn {
        name: "transform_version",
        sql_type: Type::TEXT,
        value: |r| &r.transform_version,
        array: |rs| texts(rs, |r| r.transform_version),
    },
];

fn texts<'r>(rows: &'r [LoginRow<'_>], field: impl Fn(&LoginRow<'r>) -> &'r str) -> Box<dyn ToSql + Sync + Send + 'r> {
    Box::new(rows.iter().map(field).collect::<Vec<&str>>())
}

/// A window's values as one array per column, in [`LOGIN_COLUMNS`] order (the insert's parameters).
pub fn arrays<'r>(rows: &'r [LoginRow<'_>]) -> Vec<Box<dyn ToSql + Sync + Send + 'r>> {
    LOGIN_COLUMNS.iter().map(|column| (column.array)(rows)).collect()
}

/// The column names, comma-separated, in order.
pub fn names() -> String {
    LOGIN_COLUMNS.iter().map(|c| c.name).collect::<Vec<_>>().join(", ")
}

/// `COPY user_logins (...) FROM STDIN (FORMAT binary)`.
pub static COPY_LOGINS: LazyLock<String> =
    LazyLock::new(|| format!("COPY user_logins ({}) FROM STDIN (FORMAT binary)", names()));

/// The COPY's binary types.
pub static COPY_TYPES: LazyLock<Vec<Type>> =
    LazyLock::new(|| LOGIN_COLUMNS.iter().map(|c| c.sql_type.clone()).collect());

/// `INSERT INTO user_logins (...) SELECT * FROM UNNEST($1::text[], ...) ON CONFLICT (message_id) DO NOTHING`.
pub static INSERT_LOGINS: LazyLock<String> = LazyLock::new(|| {
    let arrays: Vec<String> =
        LOGIN_COLUMNS.iter().enumerate().map(|(i, c)| format!("${}::{}[]", i + 1, array_cast(&c.sql_type))).collect();
    format!(
        "INSERT INTO user_logins ({}) SELECT * FROM UNNEST({}) ON CONFLICT (message_id) DO NOTHING",
        names(),
        arrays.join(", ")
    )
});

/// The element type an UNNEST parameter is cast to (text for the varchar columns: the column's
/// own length limit still applies on insert).
fn array_cast(sql_type: &Type) -> &'static str {
    match *sql_type {
        Type::INT4 => "int4",
        Type::DATE => "date",
        Type::TIMESTAMPTZ => "timestamptz",
        _ => "text",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_statements_name_every_column_once_in_order() {
        assert!(COPY_LOGINS.starts_with("COPY user_logins (message_id, user_id, device_type, masked_ip,"));
        assert!(COPY_LOGINS.contains("mask_key_id, transform_version) FROM STDIN"));
        assert_eq!(COPY_TYPES.len(), LOGIN_COLUMN_COUNT);
        assert!(
            INSERT_LOGINS.contains("$7::int4[], $8::text[], $9::date[], $10::timestamptz[], $11::text[], $12::text[])")
        );
        let names: std::collections::HashSet<&str> = LOGIN_COLUMNS.iter().map(|c| c.name).collect();
        assert_eq!(names.len(), LOGIN_COLUMN_COUNT);
    }
}
