//! Integration tests: one binary, each test with its own database and queue on the real
//! PostgreSQL and SQS emulator that `scripts/test.sh` starts.

mod helpers;
mod observability;
mod pipeline;
mod redrive;
mod tls;
mod vault;
