/* A small spinning thread pool for the compiled decode layer (included by decode_layer.c).

   pool_run(fn, arg) runs fn(arg, id, n) on the n = `active` threads, the caller being thread 0, and returns
   when all are done. A decode step runs ~5 jobs per layer a few µs apart, and waking a sleeping thread costs
   more than a job's share, so idle workers spin; after spin_ns without a job they sleep on a condition
   variable (a process that stops decoding gives its cores back). One job at a time: a second caller (another
   Python thread; ctypes drops the GIL) runs its job alone rather than wait. A forked child starts with no
   workers (they do not survive fork) and runs jobs alone until pl_set_threads is called again. */

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <time.h>

#define MAX_THREADS 64

typedef void (*job_fn)(const void *arg, int id, int n);
static job_fn job;
static const void *job_arg;
static atomic_int gen, done, sleeping;
static int active = 1, started = 0;
static int64_t spin_ns = 2000000;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER, busy = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static atomic_int ready; /* workers that have read gen at their start: pl_set_threads waits for them */

static void *worker(void *arg) {
    const int id = (int)(intptr_t)arg;
    int seen = atomic_load(&gen); /* no job starts before pl_set_threads returns, which waits for this */
    atomic_fetch_add(&ready, 1);
    for (;;) {
        int g = atomic_load_explicit(&gen, memory_order_acquire);
        if (g == seen) {
            int64_t t0 = id < active ? now_ns() : 0;
            for (int spins = 0; id < active && (g = atomic_load_explicit(&gen, memory_order_acquire)) == seen;) {
                cpu_relax();
                if (++spins % 1024 == 0 && now_ns() - t0 > spin_ns) break;
            }
            if (g == seen) { /* idle past spin_ns (or outside the pool): sleep until the next job */
                pthread_mutex_lock(&mu);
                atomic_fetch_add(&sleeping, 1);
                while ((g = atomic_load(&gen)) == seen) pthread_cond_wait(&cv, &mu);
                atomic_fetch_sub(&sleeping, 1);
                pthread_mutex_unlock(&mu);
            }
        }
        seen = g;
        if (id < active) {
            job(job_arg, id, active);
            atomic_fetch_add_explicit(&done, 1, memory_order_release);
        }
    }
    return NULL;
}

static void after_fork_child(void) {
    started = 0, active = 1;
    pthread_mutex_init(&mu, NULL);
    pthread_mutex_init(&busy, NULL);
    pthread_cond_init(&cv, NULL);
    atomic_store(&sleeping, 0);
    atomic_store(&ready, 0);
}

/* The pool's size (the caller included) and how long idle workers spin (ns; < 0 keeps it); starts the workers
   it lacks. Returns the size in effect (smaller when a thread cannot be created). */
int pl_set_threads(int n, int64_t spin) {
    static int hooked = 0;
    if (!hooked) hooked = pthread_atfork(NULL, NULL, after_fork_child) == 0;
    if (n < 1) n = 1;
    if (n > MAX_THREADS) n = MAX_THREADS;
    if (spin >= 0) spin_ns = spin;
    pthread_mutex_lock(&busy); /* not while a job runs */
    for (; started < n - 1; started++) {
        pthread_t th;
        if (pthread_create(&th, NULL, worker, (void *)(intptr_t)(started + 1)) != 0) break;
        pthread_detach(th);
    }
    while (atomic_load(&ready) < started) cpu_relax(); /* a late starter would miss the next job's gen */
    active = n < started + 1 ? n : started + 1;
    pthread_mutex_unlock(&busy);
    return active;
}

static void pool_run(job_fn fn, const void *arg) {
    if (active == 1 || pthread_mutex_trylock(&busy) != 0) {
        fn(arg, 0, 1);
        return;
    }
    const int n = active;
    job = fn, job_arg = arg;
    atomic_store_explicit(&done, 0, memory_order_relaxed);
    atomic_fetch_add(&gen, 1); /* seq_cst: a worker about to sleep either sees it or is counted in sleeping */
    if (atomic_load(&sleeping) > 0) {
        pthread_mutex_lock(&mu);
        pthread_cond_broadcast(&cv);
        pthread_mutex_unlock(&mu);
    }
    fn(arg, 0, n);
    while (atomic_load_explicit(&done, memory_order_acquire) < n - 1) cpu_relax();
    pthread_mutex_unlock(&busy);
}
