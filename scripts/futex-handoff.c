/*
 * Futex hand-off round trip between two threads: the main thread (core 0) wakes a helper and
 * sleeps until the helper wakes it back. With the helper on core 0 too, no inter-processor
 * interrupt is involved (the cost of the same-core hand-off an ACK helper running on the
 * primary's core would pay); on core 1, the wake crosses cores, as a kick does.
 *
 *   gcc -O2 -pthread -o futex-handoff scripts/futex-handoff.c
 *   ./futex-handoff 0    # helper on the same core
 *   ./futex-handoff 1    # helper on the other core
 */
#define _GNU_SOURCE
#include <linux/futex.h>
#include <sys/syscall.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <time.h>
#include <unistd.h>
#include <stdatomic.h>

static _Atomic int to_b = 0, to_a = 0;
static int N = 20000;
static int core_b;

static long fw(void *addr, int op, int val) { return syscall(SYS_futex, addr, op, val, NULL, NULL, 0); }
static void pin(int c) { cpu_set_t s; CPU_ZERO(&s); CPU_SET(c, &s); pthread_setaffinity_np(pthread_self(), sizeof s, &s); }
static uint64_t now() { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec*1000000000ull + t.tv_nsec; }

static void *b(void *x) {
  pin(core_b);
  for (int i = 1; i <= N; i++) {
    while (atomic_load(&to_b) < i) fw(&to_b, FUTEX_WAIT, i - 1);
    atomic_store(&to_a, i);
    fw(&to_a, FUTEX_WAKE, 1);
  }
  return 0;
}
int cmp(const void *a, const void *b) { uint64_t x = *(uint64_t*)a, y = *(uint64_t*)b; return x < y ? -1 : x > y; }
int main(int argc, char **argv) {
  core_b = atoi(argv[1]);
  pin(0);
  pthread_t t; pthread_create(&t, 0, b, 0);
  uint64_t *lat = malloc(N * sizeof *lat);
  usleep(10000);
  for (int i = 1; i <= N; i++) {
    uint64_t s = now();
    atomic_store(&to_b, i);
    fw(&to_b, FUTEX_WAKE, 1);
    while (atomic_load(&to_a) < i) fw(&to_a, FUTEX_WAIT, i - 1);
    lat[i-1] = now() - s;
  }
  pthread_join(t, 0);
  qsort(lat, N, sizeof *lat, cmp);
  printf("helper on core %d: round trip p50 %.2f us p99 %.2f us max %.2f us\n", core_b, lat[N/2]/1e3, lat[N*99/100]/1e3, lat[N-1]/1e3);
  return 0;
}
