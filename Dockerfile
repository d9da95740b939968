# syntax=docker/dockerfile:1
# kole-controller's container image: `docker build -t kole-controller:0.1.0 .` (or podman build).
#
# Stage 1 builds the release binary with the locked dependencies; stage 2 is distroless (glibc, CA
# certificates, no shell, no package manager) and runs it as the unprivileged user 65532.
# The CA certificates are the fallback roots for `mqtts://` brokers when no --tls-ca is given.

FROM docker.io/library/rust:1.89-slim-bookworm AS build
WORKDIR /src
# The whole workspace: the controller is one of its packages, and Cargo.lock pins every dependency.
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p kole-examples --bin kole-controller \
    && install -D -m 0755 target/release/kole-controller /out/kole-controller

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/kole-controller /usr/local/bin/kole-controller
USER 65532:65532
EXPOSE 8080 6443
# Health and metrics on all interfaces inside the pod (the default, 127.0.0.1, is for a desktop).
ENV KOLE_LISTEN=0.0.0.0:8080
ENTRYPOINT ["/usr/local/bin/kole-controller"]
