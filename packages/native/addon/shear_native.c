/*
 * Shear's native helpers: the Linux file system calls Node does not expose, and the address
 * check that page-aligned buffers for O_DIRECT are built on. Every function is thin: argument checks beyond "is it a number" and
 * the mapping of errno to Shear's error codes live in the TypeScript wrapper (src/addon.ts).
 *
 * Errors are thrown (or rejected) as Error objects carrying `errno` (a positive number) and
 * `syscall`; the wrapper turns them into ShearError.
 *
 * The module keeps no global state, so it loads in worker threads as well as the main thread.
 */
#define _GNU_SOURCE
#define NAPI_VERSION 8
#include <node_api.h>

#include "bitmap_kernels.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define MAX_ARGS 6

/* Returns from the calling napi function with NULL once an exception is pending. */
#define CHECK_NAPI(env, call)                                                       \
  do {                                                                              \
    if ((call) != napi_ok) {                                                        \
      bool pending_ = false;                                                        \
      napi_is_exception_pending((env), &pending_);                                  \
      if (!pending_) napi_throw_error((env), "ERR_INTERNAL", "N-API call failed: " #call); \
      return NULL;                                                                  \
    }                                                                               \
  } while (0)

static napi_value make_errno_error(napi_env env, int err, const char *syscall) {
  napi_value message, error, errno_value, syscall_value;
  if (napi_create_string_utf8(env, strerror(err), NAPI_AUTO_LENGTH, &message) != napi_ok) return NULL;
  if (napi_create_error(env, NULL, message, &error) != napi_ok) return NULL;
  if (napi_create_int32(env, err, &errno_value) != napi_ok) return NULL;
  if (napi_create_string_utf8(env, syscall, NAPI_AUTO_LENGTH, &syscall_value) != napi_ok) return NULL;
  napi_set_named_property(env, error, "errno", errno_value);
  napi_set_named_property(env, error, "syscall", syscall_value);
  return error;
}

static napi_value throw_errno(napi_env env, int err, const char *syscall) {
  napi_value error = make_errno_error(env, err, syscall);
  if (error != NULL) napi_throw(env, error);
  return NULL;
}

static bool get_args(napi_env env, napi_callback_info info, size_t want, napi_value *argv) {
  size_t argc = MAX_ARGS;
  napi_value all[MAX_ARGS];
  if (napi_get_cb_info(env, info, &argc, all, NULL, NULL) != napi_ok) return false;
  if (argc < want) {
    napi_throw_type_error(env, "ERR_INVALID_ARGUMENT", "Too few arguments");
    return false;
  }
  for (size_t i = 0; i < want; i++) argv[i] = all[i];
  return true;
}

static bool get_i64(napi_env env, napi_value value, int64_t *out) {
  napi_valuetype type;
  if (napi_typeof(env, value, &type) != napi_ok || type != napi_number) {
    napi_throw_type_error(env, "ERR_INVALID_ARGUMENT", "Expected a number");
    return false;
  }
  return napi_get_value_int64(env, value, out) == napi_ok;
}

static bool get_i32(napi_env env, napi_value value, int32_t *out) {
  int64_t wide;
  if (!get_i64(env, value, &wide)) return false;
  if (wide < INT32_MIN || wide > INT32_MAX) {
    napi_throw_range_error(env, "ERR_INVALID_ARGUMENT", "Expected a 32-bit integer");
    return false;
  }
  *out = (int32_t)wide;
  return true;
}

/* ---- the operations, shared by the sync and the threadpool variants ---- */

typedef enum { OP_FALLOCATE, OP_SYNC_FILE_RANGE, OP_FADVISE, OP_COPY_FILE_RANGE } op_kind;

typedef struct {
  op_kind kind;
  int fd_in;
  int fd_out;
  int64_t off_in;
  int64_t off_out;
  int64_t bytes;
  int flags; /* fallocate mode, sync_file_range flags or fadvise advice */
  int64_t result;
  int err;
  napi_deferred deferred;
  napi_async_work work;
} io_op;

static const char *op_syscall(op_kind kind) {
  switch (kind) {
    case OP_FALLOCATE: return "fallocate";
    case OP_SYNC_FILE_RANGE: return "sync_file_range";
    case OP_FADVISE: return "posix_fadvise";
    case OP_COPY_FILE_RANGE: return "copy_file_range";
  }
  return "unknown";
}

/* Runs on any thread; touches no JS state. */
static void run_op(io_op *op) {
  op->err = 0;
  op->result = 0;
  switch (op->kind) {
    case OP_FALLOCATE:
      while (fallocate(op->fd_out, op->flags, op->off_out, op->bytes) != 0) {
        if (errno != EINTR) { op->err = errno; return; }
      }
      return;
    case OP_SYNC_FILE_RANGE:
      while (sync_file_range(op->fd_out, op->off_out, op->bytes, (unsigned int)op->flags) != 0) {
        if (errno != EINTR) { op->err = errno; return; }
      }
      return;
    case OP_FADVISE:
      /* posix_fadvise returns the error number instead of setting errno. */
      op->err = posix_fadvise(op->fd_out, op->off_out, op->bytes, op->flags);
      return;
    case OP_COPY_FILE_RANGE: {
      /* Loops until `bytes` are copied or the source ends; a failure after some progress
         reports the progress, and the caller's next call meets the error again. */
      loff_t in = op->off_in, out = op->off_out;
      int64_t done = 0;
      while (done < op->bytes) {
        ssize_t n = copy_file_range(op->fd_in, &in, op->fd_out, &out, (size_t)(op->bytes - done), 0);
        if (n < 0) {
          if (errno == EINTR) continue;
          if (done == 0) op->err = errno;
          break;
        }
        if (n == 0) break;
        done += n;
      }
      op->result = done;
      return;
    }
  }
}

static bool parse_op(napi_env env, napi_callback_info info, op_kind kind, io_op *op) {
  napi_value argv[MAX_ARGS];
  int32_t a = 0, b = 0;
  memset(op, 0, sizeof(*op));
  op->kind = kind;
  if (kind == OP_COPY_FILE_RANGE) {
    /* (fdIn, offIn, fdOut, offOut, bytes) */
    if (!get_args(env, info, 5, argv)) return false;
    if (!get_i32(env, argv[0], &a) || !get_i64(env, argv[1], &op->off_in) || !get_i32(env, argv[2], &b) ||
        !get_i64(env, argv[3], &op->off_out) || !get_i64(env, argv[4], &op->bytes)) return false;
    op->fd_in = a;
    op->fd_out = b;
    return true;
  }
  /* fallocate (fd, mode, offset, bytes); the others (fd, offset, bytes, flags) */
  if (!get_args(env, info, 4, argv)) return false;
  if (kind == OP_FALLOCATE) {
    if (!get_i32(env, argv[0], &a) || !get_i32(env, argv[1], &b) || !get_i64(env, argv[2], &op->off_out) ||
        !get_i64(env, argv[3], &op->bytes)) return false;
  } else {
    if (!get_i32(env, argv[0], &a) || !get_i64(env, argv[1], &op->off_out) || !get_i64(env, argv[2], &op->bytes) ||
        !get_i32(env, argv[3], &b)) return false;
  }
  op->fd_out = a;
  op->flags = b;
  return true;
}

static napi_value op_result(napi_env env, io_op *op) {
  napi_value out;
  if (op->err != 0) return throw_errno(env, op->err, op_syscall(op->kind));
  CHECK_NAPI(env, napi_create_int64(env, op->result, &out));
  return out;
}

static napi_value run_sync(napi_env env, napi_callback_info info, op_kind kind) {
  io_op op;
  if (!parse_op(env, info, kind, &op)) return NULL;
  run_op(&op);
  return op_result(env, &op);
}

static void async_execute(napi_env env, void *data) {
  (void)env;
  run_op((io_op *)data);
}

static void async_complete(napi_env env, napi_status status, void *data) {
  io_op *op = (io_op *)data;
  napi_value value = NULL;
  if (status != napi_ok) {
    napi_value message;
    napi_create_string_utf8(env, "Native operation was cancelled", NAPI_AUTO_LENGTH, &message);
    napi_create_error(env, NULL, message, &value);
    napi_reject_deferred(env, op->deferred, value);
  } else if (op->err != 0) {
    value = make_errno_error(env, op->err, op_syscall(op->kind));
    napi_reject_deferred(env, op->deferred, value);
  } else {
    napi_create_int64(env, op->result, &value);
    napi_resolve_deferred(env, op->deferred, value);
  }
  napi_delete_async_work(env, op->work);
  free(op);
}

static napi_value run_async(napi_env env, napi_callback_info info, op_kind kind) {
  napi_value promise, name;
  io_op *op = malloc(sizeof(io_op));
  if (op == NULL) return throw_errno(env, ENOMEM, "malloc");
  if (!parse_op(env, info, kind, op)) {
    free(op);
    return NULL;
  }
  if (napi_create_string_utf8(env, op_syscall(kind), NAPI_AUTO_LENGTH, &name) != napi_ok ||
      napi_create_promise(env, &op->deferred, &promise) != napi_ok) {
    free(op);
    return NULL;
  }
  if (napi_create_async_work(env, NULL, name, async_execute, async_complete, op, &op->work) != napi_ok) {
    /* The deferred stays unresolved; the promise is dropped with the thrown error. */
    free(op);
    napi_throw_error(env, "ERR_INTERNAL", "Cannot create async work");
    return NULL;
  }
  if (napi_queue_async_work(env, op->work) != napi_ok) {
    napi_delete_async_work(env, op->work);
    free(op);
    napi_throw_error(env, "ERR_INTERNAL", "Cannot queue async work");
    return NULL;
  }
  return promise;
}

static napi_value Fallocate(napi_env env, napi_callback_info info) { return run_sync(env, info, OP_FALLOCATE); }
static napi_value FallocateAsync(napi_env env, napi_callback_info info) { return run_async(env, info, OP_FALLOCATE); }
static napi_value SyncFileRange(napi_env env, napi_callback_info info) { return run_sync(env, info, OP_SYNC_FILE_RANGE); }
static napi_value SyncFileRangeAsync(napi_env env, napi_callback_info info) { return run_async(env, info, OP_SYNC_FILE_RANGE); }
static napi_value Fadvise(napi_env env, napi_callback_info info) { return run_sync(env, info, OP_FADVISE); }
static napi_value FadviseAsync(napi_env env, napi_callback_info info) { return run_async(env, info, OP_FADVISE); }
static napi_value CopyFileRange(napi_env env, napi_callback_info info) { return run_sync(env, info, OP_COPY_FILE_RANGE); }
static napi_value CopyFileRangeAsync(napi_env env, napi_callback_info info) { return run_async(env, info, OP_COPY_FILE_RANGE); }

/* ---- lseek SEEK_DATA / SEEK_HOLE: quick metadata lookups, so synchronous ---- */

static napi_value seek(napi_env env, napi_callback_info info, int whence, const char *name) {
  napi_value argv[MAX_ARGS], out;
  int32_t fd;
  int64_t offset;
  off_t pos;
  if (!get_args(env, info, 2, argv) || !get_i32(env, argv[0], &fd) || !get_i64(env, argv[1], &offset)) return NULL;
  pos = lseek(fd, (off_t)offset, whence);
  if (pos < 0) {
    /* ENXIO: no data (or no hole) at or after offset, or offset at/after EOF. */
    if (errno != ENXIO) return throw_errno(env, errno, name);
    pos = -1;
  }
  CHECK_NAPI(env, napi_create_int64(env, (int64_t)pos, &out));
  return out;
}

static napi_value SeekData(napi_env env, napi_callback_info info) { return seek(env, info, SEEK_DATA, "lseek"); }
static napi_value SeekHole(napi_env env, napi_callback_info info) { return seek(env, info, SEEK_HOLE, "lseek"); }

/* ---- O_DIRECT alignment of an open file (statx STATX_DIOALIGN, Linux 6.1+) ---- */

static napi_value DioAlignment(napi_env env, napi_callback_info info) {
  napi_value argv[MAX_ARGS], out, mem, off;
  int32_t fd;
  if (!get_args(env, info, 1, argv) || !get_i32(env, argv[0], &fd)) return NULL;
#ifdef STATX_DIOALIGN
  struct statx stx;
  if (statx(fd, "", AT_EMPTY_PATH, STATX_DIOALIGN, &stx) != 0) return throw_errno(env, errno, "statx");
  if ((stx.stx_mask & STATX_DIOALIGN) == 0 || stx.stx_dio_offset_align == 0) {
    CHECK_NAPI(env, napi_get_null(env, &out));
    return out;
  }
  CHECK_NAPI(env, napi_create_object(env, &out));
  CHECK_NAPI(env, napi_create_uint32(env, stx.stx_dio_mem_align, &mem));
  CHECK_NAPI(env, napi_create_uint32(env, stx.stx_dio_offset_align, &off));
  CHECK_NAPI(env, napi_set_named_property(env, out, "memoryAlignment", mem));
  CHECK_NAPI(env, napi_set_named_property(env, out, "offsetAlignment", off));
  return out;
#else
  (void)fd;
  (void)mem;
  (void)off;
  CHECK_NAPI(env, napi_get_null(env, &out));
  return out;
#endif
}

/* ---- alignment of memory ---- */

/* addressModulo(view, m): (address of the view's first byte) mod m. Aligned buffers are made
   in JS by over-allocating an ArrayBuffer, whose off-heap memory V8 never moves, and slicing
   at the offset this reports; V8 then owns and accounts the memory like any other buffer. */
static napi_value AddressModulo(napi_env env, napi_callback_info info) {
  napi_value argv[MAX_ARGS], out, arraybuffer;
  napi_typedarray_type type;
  size_t length, byte_offset;
  void *data = NULL;
  int64_t modulus;
  bool is_typedarray = false;
  if (!get_args(env, info, 2, argv) || !get_i64(env, argv[1], &modulus)) return NULL;
  if (modulus <= 0) {
    napi_throw_range_error(env, "ERR_INVALID_ARGUMENT", "Modulus must be positive");
    return NULL;
  }
  CHECK_NAPI(env, napi_is_typedarray(env, argv[0], &is_typedarray));
  if (!is_typedarray) {
    napi_throw_type_error(env, "ERR_INVALID_ARGUMENT", "Expected a typed array");
    return NULL;
  }
  CHECK_NAPI(env, napi_get_typedarray_info(env, argv[0], &type, &length, &data, &arraybuffer, &byte_offset));
  CHECK_NAPI(env, napi_create_int64(env, (int64_t)((uintptr_t)data % (uint64_t)modulus), &out));
  return out;
}

/* ---- module ---- */

static bool set_int(napi_env env, napi_value obj, const char *name, int64_t value) {
  napi_value v;
  return napi_create_int64(env, value, &v) == napi_ok && napi_set_named_property(env, obj, name, v) == napi_ok;
}

NAPI_MODULE_INIT() {
  napi_value constants, fn;
  const struct {
    const char *name;
    napi_callback cb;
  } fns[] = {
      {"seekData", SeekData},
      {"seekHole", SeekHole},
      {"fallocate", Fallocate},
      {"fallocateAsync", FallocateAsync},
      {"syncFileRange", SyncFileRange},
      {"syncFileRangeAsync", SyncFileRangeAsync},
      {"fadvise", Fadvise},
      {"fadviseAsync", FadviseAsync},
      {"copyFileRange", CopyFileRange},
      {"copyFileRangeAsync", CopyFileRangeAsync},
      {"dioAlignment", DioAlignment},
      {"addressModulo", AddressModulo},
      {"bitmapOrWords", BitmapOrWords},
  };
  for (size_t i = 0; i < sizeof(fns) / sizeof(fns[0]); i++) {
    if (napi_create_function(env, fns[i].name, NAPI_AUTO_LENGTH, fns[i].cb, NULL, &fn) != napi_ok) return NULL;
    if (napi_set_named_property(env, exports, fns[i].name, fn) != napi_ok) return NULL;
  }
  if (napi_create_object(env, &constants) != napi_ok) return NULL;
  if (!set_int(env, constants, "FALLOC_FL_KEEP_SIZE", FALLOC_FL_KEEP_SIZE) ||
      !set_int(env, constants, "FALLOC_FL_PUNCH_HOLE", FALLOC_FL_PUNCH_HOLE) ||
      !set_int(env, constants, "FALLOC_FL_ZERO_RANGE", FALLOC_FL_ZERO_RANGE) ||
      !set_int(env, constants, "SYNC_FILE_RANGE_WAIT_BEFORE", SYNC_FILE_RANGE_WAIT_BEFORE) ||
      !set_int(env, constants, "SYNC_FILE_RANGE_WRITE", SYNC_FILE_RANGE_WRITE) ||
      !set_int(env, constants, "SYNC_FILE_RANGE_WAIT_AFTER", SYNC_FILE_RANGE_WAIT_AFTER) ||
      !set_int(env, constants, "POSIX_FADV_NORMAL", POSIX_FADV_NORMAL) ||
      !set_int(env, constants, "POSIX_FADV_RANDOM", POSIX_FADV_RANDOM) ||
      !set_int(env, constants, "POSIX_FADV_SEQUENTIAL", POSIX_FADV_SEQUENTIAL) ||
      !set_int(env, constants, "POSIX_FADV_WILLNEED", POSIX_FADV_WILLNEED) ||
      !set_int(env, constants, "POSIX_FADV_DONTNEED", POSIX_FADV_DONTNEED) ||
      !set_int(env, constants, "POSIX_FADV_NOREUSE", POSIX_FADV_NOREUSE))
    return NULL;
  if (napi_set_named_property(env, exports, "constants", constants) != napi_ok) return NULL;
  return exports;
}
