/*
 * A test double for the NVIDIA driver's libcuda.so.1: just the calls gpu-manager's checkpointer
 * makes (gpu_manager/checkpoint/libcuda.py), with the signatures and the CUcheckpointLockArgs
 * layout of cuda.h (CUDA 12.8), driven by a text file the test writes ($CUDA_STUB_STATE,
 * re-read on every call). Each call is appended to $CUDA_STUB_LOG if set.
 *
 * Build variant: -DOLD_DRIVER  no cuCheckpointProcess* at all (a driver before r570).
 *
 * State file, one directive a line:
 *   version N             what cuDriverGetVersion answers (default 12080: CUDA 12.8)
 *   init RET              what cuInit returns (default 0)
 *   state PID S           PID's CUprocessState until a call changes it (default 0, RUNNING)
 *   fail PID CALL RET     CALL (lock|checkpoint|restore|unlock|state) of PID returns RET and
 *                         changes nothing
 *   sleep PID CALL MS     CALL of PID sleeps MS first; a lock with a timeoutMs sleeps at most
 *                         that long and then returns CUDA_ERROR_NOT_READY, leaving it RUNNING
 *
 * States follow the documented transitions (RUNNING -lock-> LOCKED -checkpoint-> CHECKPOINTED
 * -restore-> LOCKED -unlock-> RUNNING), CUDA_ERROR_ILLEGAL_STATE otherwise. They are kept in
 * this library's memory: a test loads its own copy of the library to start afresh.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef int CUresult;
typedef unsigned long long cuuint64_t;
typedef struct {
    unsigned int timeoutMs;
    unsigned int reserved0;
    cuuint64_t reserved1[7];
} CUcheckpointLockArgs;

#define OK 0
#define INVALID_VALUE 1
#define ILLEGAL_STATE 401
#define NOT_READY 600
enum { RUNNING, LOCKED, CHECKPOINTED };

static void logf_(const char *call, int pid, long extra) {
    const char *path = getenv("CUDA_STUB_LOG");
    FILE *f = path ? fopen(path, "a") : NULL;
    if (!f) return;
    if (extra >= 0) fprintf(f, "%s %d %ld\n", call, pid, extra);
    else fprintf(f, "%s %d\n", call, pid);
    fclose(f);
}

/* The value of directive `key` for (pid, call), or `dflt`. pid/call are ignored when < 0/NULL. */
static long directive(const char *key, int pid, const char *call, long dflt) {
    const char *path = getenv("CUDA_STUB_STATE");
    FILE *f = path ? fopen(path, "r") : NULL;
    char line[256], k[32], c[32];
    long value = dflt, v;
    int p;
    if (!f) return dflt;
    while (fgets(line, sizeof line, f)) {
        if (pid < 0 && sscanf(line, "%31s %ld", k, &v) == 2 && !strcmp(k, key)) value = v;
        else if (pid >= 0 && !call && sscanf(line, "%31s %d %ld", k, &p, &v) == 3
                 && !strcmp(k, key) && p == pid) value = v;
        else if (call && sscanf(line, "%31s %d %31s %ld", k, &p, c, &v) == 4
                 && !strcmp(k, key) && p == pid && !strcmp(c, call)) value = v;
    }
    fclose(f);
    return value;
}

CUresult cuInit(unsigned int flags) {
    logf_("init", (int)flags, -1);
    return (CUresult)directive("init", -1, NULL, OK);
}

CUresult cuDriverGetVersion(int *version) {
    if (!version) return INVALID_VALUE;
    *version = (int)directive("version", -1, NULL, 12080);
    return OK;
}

CUresult cuGetErrorName(CUresult error, const char **name) {
    static const struct { int code; const char *name; } names[] = {
        {0, "CUDA_SUCCESS"}, {1, "CUDA_ERROR_INVALID_VALUE"}, {2, "CUDA_ERROR_OUT_OF_MEMORY"},
        {3, "CUDA_ERROR_NOT_INITIALIZED"}, {401, "CUDA_ERROR_ILLEGAL_STATE"},
        {600, "CUDA_ERROR_NOT_READY"}, {710, "CUDA_ERROR_ASSERT"},
        {801, "CUDA_ERROR_NOT_SUPPORTED"}, {909, "CUDA_ERROR_TIMEOUT"},
    };
    if (!name) return INVALID_VALUE;
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        if (names[i].code == error) { *name = names[i].name; return OK; }
    *name = NULL;
    return INVALID_VALUE;  /* what the driver does for a code it does not know */
}

#ifndef OLD_DRIVER
#define MAXPID 64
static struct { int pid, state; } procs[MAXPID];
static int nprocs;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;

/* PID's slot, created with the state file's `state` for it on first use. */
static int *state_of(int pid) {
    for (int i = 0; i < nprocs; i++)
        if (procs[i].pid == pid) return &procs[i].state;
    if (nprocs == MAXPID) abort();
    procs[nprocs].pid = pid;
    procs[nprocs].state = (int)directive("state", pid, NULL, RUNNING);
    return &procs[nprocs++].state;
}

/* One transition: the `fail` and `sleep` directives first, then from -> to or ILLEGAL_STATE. */
static CUresult step(const char *call, int pid, int from, int to, unsigned int timeout_ms) {
    long ms = directive("sleep", pid, call, 0);
    CUresult ret;
    logf_(call, pid, timeout_ms ? (long)timeout_ms : -1);
    if (timeout_ms && ms > (long)timeout_ms) {
        usleep(timeout_ms * 1000U);
        return NOT_READY;
    }
    if (ms > 0) usleep((useconds_t)ms * 1000U);
    ret = (CUresult)directive("fail", pid, call, OK);
    if (ret != OK) return ret;
    pthread_mutex_lock(&mu);
    int *state = state_of(pid);
    if (*state == from) *state = to;
    else ret = ILLEGAL_STATE;
    pthread_mutex_unlock(&mu);
    return ret;
}

CUresult cuCheckpointProcessGetState(int pid, int *out) {
    CUresult ret = (CUresult)directive("fail", pid, "state", OK);
    if (!out) return INVALID_VALUE;
    if (ret != OK) return ret;
    pthread_mutex_lock(&mu);
    *out = *state_of(pid);
    pthread_mutex_unlock(&mu);
    return OK;
}

CUresult cuCheckpointProcessLock(int pid, CUcheckpointLockArgs *args) {
    if (args) {  /* reserved fields must be zero: catches a wrong struct layout */
        int dirty = args->reserved0 != 0;
        for (int i = 0; i < 7; i++) dirty |= args->reserved1[i] != 0;
        if (dirty) return INVALID_VALUE;
    }
    return step("lock", pid, RUNNING, LOCKED, args ? args->timeoutMs : 0);
}

CUresult cuCheckpointProcessCheckpoint(int pid, void *args) {
    (void)args;
    return step("checkpoint", pid, LOCKED, CHECKPOINTED, 0);
}

CUresult cuCheckpointProcessRestore(int pid, void *args) {
    (void)args;
    return step("restore", pid, CHECKPOINTED, LOCKED, 0);
}

CUresult cuCheckpointProcessUnlock(int pid, void *args) {
    (void)args;
    return step("unlock", pid, LOCKED, RUNNING, 0);
}
#endif
