/*
 * gf_atomics.h: every atomic operation grafos-fabric uses, named for what it
 * means. Nothing else in native/ calls __atomic_* directly.
 *
 * Pairing rule: each release store has a matching acquire load on the other
 * side, and both carry the same "SYNC POINT: <name>" comment.
 */
#ifndef GF_ATOMICS_H
#define GF_ATOMICS_H

#include <stdint.h>
#include <errno.h>
#include <time.h>
#include <unistd.h>
#include <sys/syscall.h>
#include <linux/futex.h>

static inline uint64_t gf_load_relaxed_u64(const volatile uint64_t *p) {
    return __atomic_load_n(p, __ATOMIC_RELAXED);
}
static inline uint64_t gf_load_acquire_u64(const volatile uint64_t *p) {
    return __atomic_load_n(p, __ATOMIC_ACQUIRE);
}
static inline void gf_store_release_u64(volatile uint64_t *p, uint64_t v) {
    __atomic_store_n(p, v, __ATOMIC_RELEASE);
}
/* A store that is also a full fence: used where the other side may be about
 * to sleep (store, then read the other side's waiter word). */
static inline void gf_store_seq_cst_u64(volatile uint64_t *p, uint64_t v) {
    __atomic_store_n(p, v, __ATOMIC_SEQ_CST);
}
static inline uint64_t gf_load_seq_cst_u64(const volatile uint64_t *p) {
    return __atomic_load_n(p, __ATOMIC_SEQ_CST);
}
/* One read of a shared word that is checked and then used: the value in the
 * local is what was checked, whatever another process writes meanwhile. */
static inline uint32_t gf_load_relaxed_u32(const volatile uint32_t *p) {
    return __atomic_load_n(p, __ATOMIC_RELAXED);
}
static inline uint32_t gf_load_acquire_u32(const volatile uint32_t *p) {
    return __atomic_load_n(p, __ATOMIC_ACQUIRE);
}
static inline uint32_t gf_load_seq_cst_u32(const volatile uint32_t *p) {
    return __atomic_load_n(p, __ATOMIC_SEQ_CST);
}
static inline void gf_store_release_u32(volatile uint32_t *p, uint32_t v) {
    __atomic_store_n(p, v, __ATOMIC_RELEASE);
}
/* Compare-and-swap, full fence. Returns the value found (== expected on success). */
static inline uint64_t gf_cas_u64(volatile uint64_t *p, uint64_t expected, uint64_t desired) {
    __atomic_compare_exchange_n(p, &expected, desired, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    return expected;
}
/* Fetch-and-add, full fence. Returns the old value. */
static inline uint64_t gf_faa_u64(volatile uint64_t *p, uint64_t add) {
    return __atomic_fetch_add(p, add, __ATOMIC_SEQ_CST);
}
static inline uint32_t gf_faa_u32(volatile uint32_t *p, uint32_t add) {
    return __atomic_fetch_add(p, add, __ATOMIC_SEQ_CST);
}
static inline uint64_t gf_fas_u64(volatile uint64_t *p, uint64_t sub) {
    return __atomic_fetch_sub(p, sub, __ATOMIC_SEQ_CST);
}
static inline void gf_fence_seq_cst(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

static inline void gf_cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield" ::: "memory");
#endif
}

/* A process-local spinlock for one producer or consumer object. Uncontended
 * (the normal case) it is one CAS and one store. */
static inline void gf_lock(int *l) {
    while (__atomic_exchange_n(l, 1, __ATOMIC_ACQUIRE)) {
        while (__atomic_load_n(l, __ATOMIC_RELAXED)) gf_cpu_relax();
    }
}
static inline void gf_unlock(int *l) { __atomic_store_n(l, 0, __ATOMIC_RELEASE); }

static inline uint64_t gf_monotonic_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* Futex on a word in shared memory (not FUTEX_PRIVATE: other processes wake us).
 * Returns 0 when woken or the value changed, 1 on timeout. */
static inline int gf_futex_wait(volatile uint32_t *word, uint32_t expected, uint64_t timeout_ns) {
    struct timespec ts;
    ts.tv_sec = (time_t)(timeout_ns / 1000000000ull);
    ts.tv_nsec = (long)(timeout_ns % 1000000000ull);
    long rc = syscall(SYS_futex, (uint32_t *)word, FUTEX_WAIT, expected, &ts, NULL, 0);
    if (rc == -1 && errno == ETIMEDOUT) return 1;
    return 0;
}
static inline void gf_futex_wake_all(volatile uint32_t *word) {
    syscall(SYS_futex, (uint32_t *)word, FUTEX_WAKE, 0x7fffffff, NULL, NULL, 0);
}

#endif /* GF_ATOMICS_H */
