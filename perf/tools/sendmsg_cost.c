/*
 * What a sendmsg() costs, for comparing the host with and without the shipper's eBPF
 * programs attached (`sock_send_length` runs on every sendmsg of the host; docs/ebpf.md,
 * "Cost"). Prints nanoseconds per call: the minimum over 200 windows of 10,000 calls, which
 * leaves out the windows other processes disturbed on a shared machine.
 *
 *   fail    send() on an unconnected UDP socket, refused at once (EDESTADDRREQ): the cheapest
 *           sendmsg there is, so the programs' share of it is the largest
 *   unix    send() then recv() of 100 bytes on a unix datagram socketpair: a send that works
 *   eagain  send() to a full unix datagram socket (EAGAIN): the program's whole path, up to
 *           a lookup of a socket that is not watched
 *
 * Build and run (Linux, any C compiler):
 *   cc -O2 -o /tmp/sendmsg_cost perf/tools/sendmsg_cost.c && /tmp/sendmsg_cost
 * then again while a shipper runs with its programs attached (and with --no-ebpf).
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

enum { WINDOW_CALLS = 10000, WINDOWS = 200 };
enum loop { FAIL, UNIX_PAIR, EAGAIN_FULL };

static char message[100], received[200];

static double now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e9 + t.tv_nsec;
}

/* One call of `loop`; exits if the kernel answers anything but the expected outcome. */
static void call(enum loop loop, int tx, int rx) {
    ssize_t n;
    switch (loop) {
    case FAIL:
        n = send(tx, message, sizeof message, 0);
        if (n >= 0 || errno != EDESTADDRREQ) goto unexpected;
        return;
    case UNIX_PAIR:
        if (send(tx, message, sizeof message, 0) < 0) goto unexpected;
        if (recv(rx, received, sizeof received, 0) < 0) goto unexpected;
        return;
    case EAGAIN_FULL:
        n = send(tx, message, sizeof message, MSG_DONTWAIT);
        if (n >= 0 || errno != EAGAIN) goto unexpected;
        return;
    }
unexpected:
    perror("send/recv: unexpected outcome");
    exit(1);
}

static double best_ns(enum loop loop, int tx, int rx) {
    double best = 1e18;
    for (int w = 0; w < WINDOWS; w++) {
        double start = now_ns();
        for (int i = 0; i < WINDOW_CALLS; i++) call(loop, tx, rx);
        double per_call = (now_ns() - start) / WINDOW_CALLS;
        if (per_call < best) best = per_call;
    }
    return best;
}

int main(void) {
    int udp = socket(AF_INET, SOCK_DGRAM, 0);
    int pair[2];
    if (udp < 0 || socketpair(AF_UNIX, SOCK_DGRAM, 0, pair) != 0) return perror("socket"), 1;
    /* A bound unix socket that is never read, and a sender connected to it that fills it. */
    struct sockaddr_un at = {.sun_family = AF_UNIX};
    snprintf(at.sun_path, sizeof at.sun_path, "/tmp/sendmsg_cost.%d", (int)getpid());
    int full = socket(AF_UNIX, SOCK_DGRAM, 0), tx = socket(AF_UNIX, SOCK_DGRAM, 0);
    if (bind(full, (void *)&at, sizeof at) != 0 || connect(tx, (void *)&at, sizeof at) != 0)
        return perror(at.sun_path), 1;
    while (send(tx, message, sizeof message, MSG_DONTWAIT) >= 0) {
    }
    printf("fail %.1f ns  unix %.1f ns  eagain %.1f ns\n", best_ns(FAIL, udp, -1),
           best_ns(UNIX_PAIR, pair[0], pair[1]), best_ns(EAGAIN_FULL, tx, -1));
    unlink(at.sun_path);
    return 0;
}
