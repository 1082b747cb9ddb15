# Multi-stage build: compile in the Rust image, run in a slim Debian image as a non-root user.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin loginflow

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home loginflow
COPY --from=build /src/target/release/loginflow /usr/local/bin/loginflow
COPY data /app/data
USER 10001
ENV METRICS_ADDR=0.0.0.0:9898 LOG_FORMAT=json
EXPOSE 9898
HEALTHCHECK --interval=10s --timeout=3s CMD curl -fsS http://127.0.0.1:9898/healthz || exit 1
ENTRYPOINT ["loginflow"]
CMD ["run"]
