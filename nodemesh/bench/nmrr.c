/* nmrr: TCP request/response micro-benchmark for the datapath section of `nodemesh bench`.
 *
 * Built by the harness at run time (cc -O2), run inside pod network namespaces:
 *   nmrr server PORT                          echo server (epoll, one thread)
 *   nmrr rr   HOST PORT SIZE SECONDS          one connection, SIZE-byte request/response loop
 *   nmrr crr  HOST PORT SIZE SECONDS          connect, request/response, close (RST), repeat
 *   nmrr cps  HOST PORT SIZE SECONDS PARALLEL PARALLEL crr loops at once (new connections/s)
 *   nmrr flood HOST PORT SECONDS              hostile neighbour: non-blocking connect and close
 *                                             (RST) as fast as it can, never waiting for the
 *                                             handshake; prints attempts and attempts/s
 * Clients print one JSON object: count, seconds, rate, latency percentiles in microseconds,
 * errors. Closes use SO_LINGER {1, 0} so neither side keeps TIME_WAIT sockets.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAXBUF 65536

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void die(const char *what) {
    perror(what);
    exit(2);
}

/* ---- latency samples ---------------------------------------------------------------------- */
static uint32_t *samples;
static size_t nsamples, capsamples;

static void record(uint64_t ns) {
    if (nsamples == capsamples) {
        capsamples = capsamples ? capsamples * 2 : 1 << 16;
        samples = realloc(samples, capsamples * sizeof(*samples));
        if (!samples) die("realloc");
    }
    samples[nsamples++] = ns > UINT32_MAX ? UINT32_MAX : (uint32_t)ns;
}

static int cmp_u32(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

static double pct(double p) {
    if (!nsamples) return 0;
    size_t i = (size_t)(p / 100.0 * (double)(nsamples - 1) + 0.5);
    return samples[i] / 1000.0;
}

static void report(const char *mode, double seconds, long errors) {
    qsort(samples, nsamples, sizeof(*samples), cmp_u32);
    double sum = 0;
    for (size_t i = 0; i < nsamples; i++) sum += samples[i];
    printf("{\"mode\": \"%s\", \"count\": %zu, \"seconds\": %.4f, \"rate\": %.1f, "
           "\"mean_us\": %.2f, \"p50_us\": %.2f, \"p90_us\": %.2f, \"p99_us\": %.2f, "
           "\"p999_us\": %.2f, \"max_us\": %.2f, \"errors\": %ld}\n",
           mode, nsamples, seconds, nsamples / seconds, nsamples ? sum / nsamples / 1000.0 : 0,
           pct(50), pct(90), pct(99), pct(99.9), nsamples ? samples[nsamples - 1] / 1000.0 : 0,
           errors);
    fflush(stdout);
}

/* ---- helpers ------------------------------------------------------------------------------ */
static void set_linger0(int fd) {
    struct linger l = {1, 0};
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, sizeof(l));
}

static void set_nodelay(int fd) {
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

static struct sockaddr_in target(const char *host, const char *port) {
    struct sockaddr_in a;
    memset(&a, 0, sizeof(a));
    a.sin_family = AF_INET;
    a.sin_port = htons((uint16_t)atoi(port));
    if (inet_pton(AF_INET, host, &a.sin_addr) != 1) {
        fprintf(stderr, "nmrr: %s: not an IPv4 address\n", host);
        exit(2);
    }
    return a;
}

static int full_io(int fd, char *buf, size_t n, int writing) {
    size_t done = 0;
    while (done < n) {
        ssize_t r = writing ? write(fd, buf + done, n - done) : read(fd, buf + done, n - done);
        if (r <= 0) {
            if (r < 0 && errno == EINTR) continue;
            return -1;
        }
        done += (size_t)r;
    }
    return 0;
}

/* ---- server ------------------------------------------------------------------------------- */
static int server(const char *port) {
    int ls = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    int one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    struct sockaddr_in a = target("0.0.0.0", port);
    if (bind(ls, (struct sockaddr *)&a, sizeof(a)) < 0) die("bind");
    if (listen(ls, 4096) < 0) die("listen");
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = ls};
    epoll_ctl(ep, EPOLL_CTL_ADD, ls, &ev);
    static char buf[MAXBUF];
    struct epoll_event evs[256];
    for (;;) {
        int n = epoll_wait(ep, evs, 256, -1);
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (fd == ls) {
                for (;;) {
                    int c = accept4(ls, NULL, NULL, SOCK_NONBLOCK);
                    if (c < 0) break;
                    set_nodelay(c);
                    struct epoll_event cev = {.events = EPOLLIN, .data.fd = c};
                    epoll_ctl(ep, EPOLL_CTL_ADD, c, &cev);
                }
                continue;
            }
            ssize_t r = read(fd, buf, sizeof(buf));
            if (r <= 0) {
                if (r < 0 && errno == EAGAIN) continue;
                set_linger0(fd);
                close(fd);
                continue;
            }
            /* Replies are small: a non-blocking write of what was read completes at once. */
            if (write(fd, buf, (size_t)r) != r) {
                set_linger0(fd);
                close(fd);
            }
        }
    }
    return 0;
}

/* ---- clients ------------------------------------------------------------------------------ */
static int connect_blocking(const struct sockaddr_in *a) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) return -1;
    set_nodelay(fd);
    if (connect(fd, (const struct sockaddr *)a, sizeof(*a)) < 0) {
        close(fd);
        return -1;
    }
    return fd;
}

static int rr(const struct sockaddr_in *a, size_t size, double seconds) {
    char buf[MAXBUF];
    memset(buf, 'x', sizeof(buf));
    int fd = connect_blocking(a);
    if (fd < 0) die("connect");
    long errors = 0;
    uint64_t start = now_ns(), end = start + (uint64_t)(seconds * 1e9);
    uint64_t t = start;
    while (t < end) {
        if (full_io(fd, buf, size, 1) < 0 || full_io(fd, buf, size, 0) < 0) {
            errors++;
            break;
        }
        uint64_t t2 = now_ns();
        record(t2 - t);
        t = t2;
    }
    set_linger0(fd);
    close(fd);
    report("rr", (double)(t - start) / 1e9, errors);
    return 0;
}

static int crr(const struct sockaddr_in *a, size_t size, double seconds) {
    char buf[MAXBUF];
    memset(buf, 'x', sizeof(buf));
    long errors = 0;
    uint64_t start = now_ns(), end = start + (uint64_t)(seconds * 1e9);
    uint64_t t = start;
    while (t < end) {
        int fd = connect_blocking(a);
        int ok = fd >= 0 && full_io(fd, buf, size, 1) == 0 && full_io(fd, buf, size, 0) == 0;
        if (fd >= 0) {
            set_linger0(fd);
            close(fd);
        }
        uint64_t t2 = now_ns();
        if (ok) record(t2 - t);
        else errors++;
        t = t2;
    }
    report("crr", (double)(t - start) / 1e9, errors);
    return 0;
}

/* PARALLEL non-blocking connect/request/response/close loops at once. */
struct slot {
    int fd;
    int state; /* 0 connecting, 1 reading */
    size_t got;
    uint64_t t0;
};

static int cps(const struct sockaddr_in *a, size_t size, double seconds, int parallel) {
    static char buf[MAXBUF];
    memset(buf, 'x', sizeof(buf));
    int ep = epoll_create1(0);
    struct slot *slots = calloc((size_t)parallel, sizeof(*slots));
    long errors = 0;
    uint64_t start = now_ns(), end = start + (uint64_t)(seconds * 1e9);

    /* (Re)start slot i: a new non-blocking connect. */
#define START(i)                                                                              \
    do {                                                                                      \
        struct slot *s_ = &slots[i];                                                          \
        s_->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);                             \
        set_nodelay(s_->fd);                                                                  \
        s_->state = 0;                                                                        \
        s_->got = 0;                                                                          \
        s_->t0 = now_ns();                                                                    \
        int rc_ = connect(s_->fd, (const struct sockaddr *)a, sizeof(*a));                    \
        if (rc_ < 0 && errno != EINPROGRESS) {                                                \
            errors++;                                                                         \
        }                                                                                     \
        struct epoll_event e_ = {.events = EPOLLOUT, .data.u32 = (uint32_t)(i)};              \
        epoll_ctl(ep, EPOLL_CTL_ADD, s_->fd, &e_);                                            \
    } while (0)

    for (int i = 0; i < parallel; i++) START(i);
    struct epoll_event evs[1024];
    uint64_t t = start;
    while (t < end) {
        int n = epoll_wait(ep, evs, 1024, 100);
        t = now_ns();
        for (int k = 0; k < n; k++) {
            int i = (int)evs[k].data.u32;
            struct slot *s = &slots[i];
            int failed = 0, finished = 0;
            if (s->state == 0) {
                int err = 0;
                socklen_t len = sizeof(err);
                getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &err, &len);
                if (err || write(s->fd, buf, size) != (ssize_t)size) {
                    failed = 1;
                } else {
                    s->state = 1;
                    struct epoll_event e = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
                    epoll_ctl(ep, EPOLL_CTL_MOD, s->fd, &e);
                }
            } else {
                ssize_t r = read(s->fd, buf, sizeof(buf));
                if (r <= 0) {
                    if (r < 0 && errno == EAGAIN) continue;
                    failed = 1;
                } else if ((s->got += (size_t)r) >= size) {
                    finished = 1;
                }
            }
            if (failed || finished) {
                if (finished) record(t - s->t0);
                else errors++;
                epoll_ctl(ep, EPOLL_CTL_DEL, s->fd, NULL);
                set_linger0(s->fd);
                close(s->fd);
                START(i);
            }
        }
    }
    report("cps", (double)(t - start) / 1e9, errors);
    return 0;
}

static int flood(const struct sockaddr_in *a, double seconds) {
    uint64_t start = now_ns(), end = start + (uint64_t)(seconds * 1e9);
    long attempts = 0, errors = 0;
    while (1) {
        for (int i = 0; i < 64; i++) {
            int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
            if (fd < 0) { errors++; continue; }
            set_linger0(fd);
            if (connect(fd, (const struct sockaddr *)a, sizeof(*a)) < 0 && errno != EINPROGRESS)
                errors++;
            close(fd);
            attempts++;
        }
        if (now_ns() >= end) break;
    }
    double secs = (double)(now_ns() - start) / 1e9;
    printf("{\"mode\":\"flood\",\"attempts\":%ld,\"seconds\":%.3f,\"rate\":%.1f,"
           "\"errors\":%ld}\n", attempts, secs, attempts / secs, errors);
    return 0;
}

int main(int argc, char **argv) {
    if (argc >= 3 && !strcmp(argv[1], "server")) return server(argv[2]);
    if (argc >= 5 && !strcmp(argv[1], "flood")) {
        struct sockaddr_in a = target(argv[2], argv[3]);
        return flood(&a, atof(argv[4]));
    }
    if (argc >= 6) {
        struct sockaddr_in a = target(argv[2], argv[3]);
        size_t size = (size_t)atoi(argv[4]);
        double seconds = atof(argv[5]);
        if (size < 1 || size > MAXBUF) size = 64;
        if (!strcmp(argv[1], "rr")) return rr(&a, size, seconds);
        if (!strcmp(argv[1], "crr")) return crr(&a, size, seconds);
        if (!strcmp(argv[1], "cps") && argc >= 7) return cps(&a, size, seconds, atoi(argv[6]));
    }
    fprintf(stderr, "usage: nmrr server PORT | nmrr rr|crr HOST PORT SIZE SECONDS | "
                    "nmrr cps HOST PORT SIZE SECONDS PARALLEL | nmrr flood HOST PORT SECONDS\n");
    return 2;
}
