/* Fake libcuda.so.1 for the driver backend's tests (see README.md).
 * Each checkpoint entry point runs the fake `cuda-checkpoint --shim`, so both backends share one fake.
 * FAKE_CUDA_CHECKPOINT names that program; FAKE_CUDA_STATE_DIR the fake GPU's state. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef int CUresult;
typedef struct { unsigned int timeoutMs; unsigned int reserved0; unsigned long long reserved1[7]; } CUcheckpointLockArgs;

static CUresult run_shim(const char *args, int pid, int *state_out) {
    const char *prog = getenv("FAKE_CUDA_CHECKPOINT");
    char cmd[4096];
    if (!prog) return 999;
    snprintf(cmd, sizeof cmd, "'%s' --shim %s --pid %d", prog, args, pid);
    FILE *p = popen(cmd, "r");
    if (!p) return 304;
    int result = 999, state = -1;
    int n = fscanf(p, "%d %d", &result, &state);
    pclose(p);
    if (n < 1) return 999;
    if (state_out) *state_out = state;
    return result;
}

CUresult cuInit(unsigned int flags) {
    (void)flags;
    const char *dir = getenv("FAKE_CUDA_STATE_DIR");
    if (dir) {
        char path[4096];
        snprintf(path, sizeof path, "%s/cuinit", dir);
        FILE *f = fopen(path, "a");
        if (f) { fputs("cuInit called\n", f); fclose(f); }
    }
    return 0;
}

CUresult cuDriverGetVersion(int *version) { *version = 13000; return 0; }

CUresult cuGetErrorString(CUresult error, const char **text) {
    switch (error) {
    case 0: *text = "no error"; break;
    case 1: *text = "invalid argument"; break;
    case 3: *text = "initialization error"; break;
    case 304: *text = "OS call failed or operation not supported on this OS"; break;
    case 401: *text = "the operation cannot be performed in the present state"; break;
    case 600: *text = "device not ready"; break;
    default: *text = "unknown error"; break;
    }
    return 0;
}

CUresult cuCheckpointProcessGetState(int pid, int *state) {
    return run_shim("--get-state", pid, state);
}

CUresult cuCheckpointProcessLock(int pid, CUcheckpointLockArgs *args) {
    char a[64];
    snprintf(a, sizeof a, "--action lock --timeout %u", args ? args->timeoutMs : 0u);
    return run_shim(a, pid, NULL);
}

CUresult cuCheckpointProcessCheckpoint(int pid, void *args) { (void)args; return run_shim("--action checkpoint", pid, NULL); }
CUresult cuCheckpointProcessRestore(int pid, void *args) { (void)args; return run_shim("--action restore", pid, NULL); }
CUresult cuCheckpointProcessUnlock(int pid, void *args) { (void)args; return run_shim("--action unlock", pid, NULL); }
CUresult cuCheckpointProcessGetRestoreThreadId(int pid, int *tid) { (void)pid; *tid = 0; return 0; }
