/*
 * A test double for the NVIDIA driver's libnvidia-ml.so.1: just the calls gpu-manager makes,
 * with the struct layouts of nvml.h, driven by a text state file the test writes
 * ($NVML_STUB_STATE, re-read on every call). Calls are appended to $NVML_STUB_LOG if set.
 *
 * Build variants drop symbols the way older drivers lack them:
 *   -DNO_MEM_V2   no nvmlDeviceGetMemoryInfo_v2
 *   -DNO_PROC_V3  no nvml*RunningProcesses_v3
 *   -DNO_PROC_V2  no nvml*RunningProcesses_v2
 *   -DNO_PROC_UTIL no nvmlDeviceGetProcessUtilization
 *
 * State file, one directive a line:
 *   init RET                      what nvmlInitWithFlags returns (default 0)
 *   driver VERSION
 *   device IDX TOTAL FREE RESERVED TEMP UTIL   (bytes; one line per device)
 *   name IDX TEXT...              uuid IDX TEXT
 *   memret IDX RET                procret IDX RET          tempret IDX RET
 *   lost IDX                      every device call returns NVML_ERROR_GPU_IS_LOST
 *   proc IDX c|g PID BYTES|NA     a compute or graphics process
 *   putil IDX PID TIMESTAMP SM    a per-process utilisation sample (TIMESTAMP in µs)
 *   putilret IDX RET              what nvmlDeviceGetProcessUtilization returns instead
 *
 * nvmlDeviceGetProcessUtilization returns the samples newer than the lastSeenTimeStamp it is
 * given (NVML_ERROR_NOT_FOUND when there are none, as the driver does) and logs that
 * timestamp: "nvmlDeviceGetProcessUtilization since=TS".
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef int nvmlReturn_t;
typedef struct nvmlDevice_st *nvmlDevice_t;

#define NVML_SUCCESS 0
#define NVML_ERROR_UNINITIALIZED 1
#define NVML_ERROR_INVALID_ARGUMENT 2
#define NVML_ERROR_NOT_SUPPORTED 3
#define NVML_ERROR_NOT_FOUND 6
#define NVML_ERROR_INSUFFICIENT_SIZE 7
#define NVML_ERROR_GPU_IS_LOST 15
#define NVML_ERROR_ARGUMENT_VERSION_MISMATCH 25
#define NVML_VALUE_NOT_AVAILABLE_ULL (~0ULL)

typedef struct { unsigned long long total, free, used; } nvmlMemory_t;
typedef struct {
    unsigned int version;
    unsigned long long total, reserved, free, used;
} nvmlMemory_v2_t;
#define nvmlMemory_v2 ((unsigned int)(sizeof(nvmlMemory_v2_t) | (2 << 24U)))
typedef struct { unsigned int gpu, memory; } nvmlUtilization_t;
typedef struct { unsigned int pid; unsigned long long usedGpuMemory; } nvmlProcessInfo_v1_t;
typedef struct {
    unsigned int pid;
    unsigned long long usedGpuMemory;
    unsigned int gpuInstanceId, computeInstanceId;
} nvmlProcessInfo_v2_t;
typedef struct {
    unsigned int pid;
    unsigned long long timeStamp;
    unsigned int smUtil, memUtil, encUtil, decUtil;
} nvmlProcessUtilizationSample_t;

#define MAXDEV 8
#define MAXPROC 64
#define MAXSAMPLE 64

typedef struct {
    int present, lost, memret, procret, tempret, putilret;
    unsigned long long total, free, reserved;
    unsigned int temp, util;
    char name[96], uuid[96];
} dev_t_;
typedef struct { int dev; char kind; unsigned int pid; unsigned long long bytes; } proc_t_;
typedef struct { int dev; unsigned int pid, sm; unsigned long long ts; } sample_t_;

static struct {
    int init_ret, ndev, nproc, nsample, initialized;
    char driver[80];
    dev_t_ dev[MAXDEV];
    proc_t_ proc[MAXPROC];
    sample_t_ sample[MAXSAMPLE];
} S;

static void log_call(const char *fn) {
    const char *path = getenv("NVML_STUB_LOG");
    if (!path) return;
    FILE *f = fopen(path, "a");
    if (f) { fprintf(f, "%s\n", fn); fclose(f); }
}

static void load(void) {
    int initialized = S.initialized;
    memset(&S, 0, sizeof S);
    S.initialized = initialized;
    strcpy(S.driver, "0.0");
    const char *path = getenv("NVML_STUB_STATE");
    FILE *f = path ? fopen(path, "r") : NULL;
    if (!f) return;
    char line[512], word[32], rest[256];
    while (fgets(line, sizeof line, f)) {
        int i = -1;
        line[strcspn(line, "\n")] = 0;
        if (sscanf(line, "%31s", word) != 1) continue;
        if (!strcmp(word, "init")) sscanf(line, "%*s %d", &S.init_ret);
        else if (!strcmp(word, "driver")) sscanf(line, "%*s %79s", S.driver);
        else if (sscanf(line, "%*s %d", &i) != 1 || i < 0 || i >= MAXDEV) continue;
        else if (!strcmp(word, "device")) {
            dev_t_ *d = &S.dev[i];
            d->present = 1;
            sscanf(line, "%*s %*d %llu %llu %llu %u %u", &d->total, &d->free, &d->reserved,
                   &d->temp, &d->util);
            if (i + 1 > S.ndev) S.ndev = i + 1;
        } else if (!strcmp(word, "name") && sscanf(line, "%*s %*d %255[^\n]", rest) == 1)
            snprintf(S.dev[i].name, sizeof S.dev[i].name, "%.95s", rest);
        else if (!strcmp(word, "uuid") && sscanf(line, "%*s %*d %255s", rest) == 1)
            snprintf(S.dev[i].uuid, sizeof S.dev[i].uuid, "%.95s", rest);
        else if (!strcmp(word, "memret")) sscanf(line, "%*s %*d %d", &S.dev[i].memret);
        else if (!strcmp(word, "procret")) sscanf(line, "%*s %*d %d", &S.dev[i].procret);
        else if (!strcmp(word, "tempret")) sscanf(line, "%*s %*d %d", &S.dev[i].tempret);
        else if (!strcmp(word, "putilret")) sscanf(line, "%*s %*d %d", &S.dev[i].putilret);
        else if (!strcmp(word, "lost")) S.dev[i].lost = 1;
        else if (!strcmp(word, "putil") && S.nsample < MAXSAMPLE) {
            sample_t_ *p = &S.sample[S.nsample];
            if (sscanf(line, "%*s %*d %u %llu %u", &p->pid, &p->ts, &p->sm) == 3) {
                p->dev = i;
                S.nsample++;
            }
        }
        else if (!strcmp(word, "proc") && S.nproc < MAXPROC) {
            proc_t_ *p = &S.proc[S.nproc];
            char kind[4], bytes[32];
            if (sscanf(line, "%*s %*d %3s %u %31s", kind, &p->pid, bytes) == 3) {
                p->dev = i;
                p->kind = kind[0];
                p->bytes = !strcmp(bytes, "NA") ? NVML_VALUE_NOT_AVAILABLE_ULL
                                                 : strtoull(bytes, NULL, 10);
                S.nproc++;
            }
        }
    }
    fclose(f);
}

/* Every device call: reload the state, check init, resolve the handle, honour `lost`. */
static nvmlReturn_t enter(const char *fn, nvmlDevice_t h, dev_t_ **out) {
    log_call(fn);
    load();
    if (!S.initialized) return NVML_ERROR_UNINITIALIZED;
    long idx = (long)(size_t)h - 1;
    if (idx < 0 || idx >= S.ndev || !S.dev[idx].present) return NVML_ERROR_INVALID_ARGUMENT;
    *out = &S.dev[idx];
    return (*out)->lost ? NVML_ERROR_GPU_IS_LOST : NVML_SUCCESS;
}

nvmlReturn_t nvmlInitWithFlags(unsigned int flags) {
    (void)flags;
    log_call("nvmlInitWithFlags");
    load();
    if (S.init_ret == NVML_SUCCESS) S.initialized = 1;
    return S.init_ret;
}
nvmlReturn_t nvmlInit_v2(void) { return nvmlInitWithFlags(0); }
nvmlReturn_t nvmlShutdown(void) { log_call("nvmlShutdown"); S.initialized = 0; return 0; }

const char *nvmlErrorString(nvmlReturn_t r) {
    switch (r) {
    case 0: return "Success";
    case 1: return "Uninitialized";
    case 2: return "Invalid Argument";
    case 3: return "Not Supported";
    case 6: return "Not Found";
    case 7: return "Insufficient Size";
    case 9: return "Driver Not Loaded";
    case 13: return "Function Not Found";
    case 15: return "GPU is lost";
    case 18: return "RM has detected an NVML/RM version mismatch.";
    case 25: return "Argument version mismatch";
    default: return "Unknown Error";
    }
}

nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length) {
    log_call("nvmlSystemGetDriverVersion");
    load();
    snprintf(version, length, "%s", S.driver);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *count) {
    log_call("nvmlDeviceGetCount_v2");
    load();
    if (!S.initialized) return NVML_ERROR_UNINITIALIZED;
    *count = (unsigned int)S.ndev;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device) {
    log_call("nvmlDeviceGetHandleByIndex_v2");
    load();
    if (!S.initialized) return NVML_ERROR_UNINITIALIZED;
    if (index >= (unsigned int)S.ndev) return NVML_ERROR_INVALID_ARGUMENT;
    *device = (nvmlDevice_t)(size_t)(index + 1);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t h, char *name, unsigned int length) {
    dev_t_ *d;
    nvmlReturn_t r = enter("nvmlDeviceGetName", h, &d);
    if (r) return r;
    snprintf(name, length, "%s", d->name);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t h, char *uuid, unsigned int length) {
    dev_t_ *d;
    nvmlReturn_t r = enter("nvmlDeviceGetUUID", h, &d);
    if (r) return r;
    snprintf(uuid, length, "%s", d->uuid);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t h, nvmlMemory_t *m) {
    dev_t_ *d;
    nvmlReturn_t r = enter("nvmlDeviceGetMemoryInfo", h, &d);
    if (r) return r;
    if (d->memret) return d->memret;
    m->total = d->total;
    m->free = d->free;
    m->used = d->total - d->free; /* v1's used includes the reserved memory */
    return NVML_SUCCESS;
}

#ifndef NO_MEM_V2
nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t h, nvmlMemory_v2_t *m) {
    dev_t_ *d;
    nvmlReturn_t r = enter("nvmlDeviceGetMemoryInfo_v2", h, &d);
    if (r) return r;
    if (m->version != nvmlMemory_v2) return NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
    if (d->memret) return d->memret;
    m->total = d->total;
    m->reserved = d->reserved;
    m->free = d->free;
    m->used = d->total - d->free - d->reserved;
    return NVML_SUCCESS;
}
#endif

nvmlReturn_t nvmlDeviceGetTemperature(nvmlDevice_t h, int sensor, unsigned int *temp) {
    dev_t_ *d;
    nvmlReturn_t r = enter("nvmlDeviceGetTemperature", h, &d);
    if (r) return r;
    if (sensor != 0) return NVML_ERROR_INVALID_ARGUMENT;
    if (d->tempret) return d->tempret;
    *temp = d->temp;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetUtilizationRates(nvmlDevice_t h, nvmlUtilization_t *u) {
    dev_t_ *d;
    nvmlReturn_t r = enter("nvmlDeviceGetUtilizationRates", h, &d);
    if (r) return r;
    u->gpu = d->util;
    u->memory = 0;
    return NVML_SUCCESS;
}

/* The size protocol of every *RunningProcesses call: ask with too small a count (or a NULL
 * array), get NVML_ERROR_INSUFFICIENT_SIZE and the needed count; no processes is SUCCESS. */
static nvmlReturn_t procs(const char *fn, nvmlDevice_t h, char kind, unsigned int *count,
                          void *infos, int version) {
    dev_t_ *d;
    nvmlReturn_t r = enter(fn, h, &d);
    if (r) return r;
    if (d->procret) return d->procret;
    long idx = (long)(size_t)h - 1;
    unsigned int n = 0;
    for (int i = 0; i < S.nproc; i++)
        if (S.proc[i].dev == idx && S.proc[i].kind == kind) n++;
    if (n == 0) { *count = 0; return NVML_SUCCESS; }
    if (!infos || *count < n) { *count = n; return NVML_ERROR_INSUFFICIENT_SIZE; }
    unsigned int k = 0;
    for (int i = 0; i < S.nproc; i++) {
        if (S.proc[i].dev != idx || S.proc[i].kind != kind) continue;
        if (version == 1) {
            nvmlProcessInfo_v1_t *p = (nvmlProcessInfo_v1_t *)infos + k;
            p->pid = S.proc[i].pid;
            p->usedGpuMemory = S.proc[i].bytes;
        } else {
            nvmlProcessInfo_v2_t *p = (nvmlProcessInfo_v2_t *)infos + k;
            p->pid = S.proc[i].pid;
            p->usedGpuMemory = S.proc[i].bytes;
            p->gpuInstanceId = 0xFFFFFFFF;
            p->computeInstanceId = 0xFFFFFFFF;
        }
        k++;
    }
    *count = k;
    return NVML_SUCCESS;
}

#define PROC_FN(NAME, KIND, VERSION)                                                  \
    nvmlReturn_t NAME(nvmlDevice_t h, unsigned int *count, void *infos) {             \
        return procs(#NAME, h, KIND, count, infos, VERSION);                          \
    }

PROC_FN(nvmlDeviceGetComputeRunningProcesses, 'c', 1)
PROC_FN(nvmlDeviceGetGraphicsRunningProcesses, 'g', 1)
#ifndef NO_PROC_V2
PROC_FN(nvmlDeviceGetComputeRunningProcesses_v2, 'c', 2)
PROC_FN(nvmlDeviceGetGraphicsRunningProcesses_v2, 'g', 2)
#endif
#ifndef NO_PROC_V3
PROC_FN(nvmlDeviceGetComputeRunningProcesses_v3, 'c', 3)
PROC_FN(nvmlDeviceGetGraphicsRunningProcesses_v3, 'g', 3)
#endif

#ifndef NO_PROC_UTIL
nvmlReturn_t nvmlDeviceGetProcessUtilization(nvmlDevice_t h,
                                             nvmlProcessUtilizationSample_t *utilization,
                                             unsigned int *count,
                                             unsigned long long lastSeenTimeStamp) {
    char fn[96];
    dev_t_ *d;
    snprintf(fn, sizeof fn, "nvmlDeviceGetProcessUtilization since=%llu", lastSeenTimeStamp);
    nvmlReturn_t r = enter(fn, h, &d);
    if (r) return r;
    if (d->putilret) return d->putilret;
    long idx = (long)(size_t)h - 1;
    unsigned int n = 0;
    for (int i = 0; i < S.nsample; i++)
        if (S.sample[i].dev == idx && S.sample[i].ts > lastSeenTimeStamp) n++;
    if (n == 0) return NVML_ERROR_NOT_FOUND;
    if (!utilization || *count < n) { *count = n; return NVML_ERROR_INSUFFICIENT_SIZE; }
    unsigned int k = 0;
    for (int i = 0; i < S.nsample; i++) {
        if (S.sample[i].dev != idx || S.sample[i].ts <= lastSeenTimeStamp) continue;
        nvmlProcessUtilizationSample_t *p = utilization + k++;
        memset(p, 0, sizeof *p);
        p->pid = S.sample[i].pid;
        p->timeStamp = S.sample[i].ts;
        p->smUtil = S.sample[i].sm;
    }
    *count = k;
    return NVML_SUCCESS;
}
#endif
