/* Declarations shared by the sources of otel_recovery._speedups (see module.c for
 * what the module is and why). Everything here is internal to the extension. */
#ifndef OTEL_RECOVERY_SPEEDUPS_H
#define OTEL_RECOVERY_SPEEDUPS_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <time.h>

#if defined(__GNUC__)
#define INTERNAL __attribute__((visibility("hidden")))
/* The per-call path is cold in the caches between two client calls (a Redis GET runs some
 * 450,000 instructions of client and OpenTelemetry code): HOT gathers its functions in one
 * place (.text.hot), COLD moves the failure paths out of it. */
#define HOT __attribute__((hot))
#define COLD __attribute__((cold))
/* A function benchmarks/layer_own_cost.py names to callgrind must stay a function. */
#define NOINLINE __attribute__((noinline))
/* The branch a remembered happy call takes: error paths go out of the hot code's way. */
#define LIKELY(x) __builtin_expect(!!(x), 1)
#define UNLIKELY(x) __builtin_expect(!!(x), 0)
#else
#define INTERNAL
#define HOT
#define COLD
#define NOINLINE
#define LIKELY(x) (x)
#define UNLIKELY(x) (x)
#endif

#if defined(__linux__) && defined(CLOCK_MONOTONIC)
#define HAVE_DIRECT_MONOTONIC 1
#else
#define HAVE_DIRECT_MONOTONIC 0
#endif

/* Attribute names and the like, interned once by module.c. */
extern INTERNAL PyObject *str_active, *str_permit_all, *str_tally, *str_bucket_end,
    *str_can_execute, *str_record_call, *str_record_success, *str_release, *str_enabled,
    *str_seen, *str_run, *str_statuses, *str_method, *str_url, *str_mro, *str_dunder_class,
    *kw_release_false;
extern INTERNAL PyObject *time_monotonic; /* time.monotonic, to recognise the stock clock */

typedef struct {
    PyObject *const *argv;
    Py_ssize_t nargs;
    PyObject *kwnames;
    PyObject *args;   /* tuple, or NULL until materialized */
    PyObject *kwargs; /* dict, or NULL until materialized */
    int owned;        /* args/kwargs were built here and must be released */
} CallArgs;

typedef struct {
    PyTypeObject *type; /* borrowed: the object the reader was made for keeps it alive */
    Py_ssize_t offset;  /* -1: use PyObject_GetAttr */
    PyObject *name;
} SlotReader;

typedef struct {
    PyObject_HEAD
    PyObject *switches;
    PyObject *now;
    PyObject *breaker; /* Py_None: no breaker */
    PyObject *budget;  /* Py_None: no budget */
    PyObject *counter; /* Py_None: call budget.record_call; else one next() deposits */
    PyObject *remember;
    PyObject *recover;
    PyObject *reject;
    PyObject *rejection;
    PyObject *resolve; /* Py_None: a sync runner; else async: run() returns an AsyncRun */
    int gate_unlocked;
    int tallied;
    int monotonic; /* now is time.monotonic: read the clock here */
    SlotReader active, permit_all, tally, bucket_end;
    vectorcallfunc vectorcall;
} RunnerObject;

/* When the call started: read at once as a double, made a float object only for the
 * slow paths that take it. */
typedef struct {
    double seconds;
    PyObject *value; /* NULL until needed */
} Started;

/* What every compiled layer starts with: where it sits in the wrapper chain (the Python layer
 * it accelerates, the method it calls to go on) and what says whether it runs (its PatchSet's
 * `enabled`, the suppression keys in the current OpenTelemetry Context). */
#define LAYER_HEAD                                                                      \
    PyObject_HEAD                                                                       \
    PyObject *dict; /* __dict__: __wrapped__, __name__, __qualname__, __doc__ */        \
    PyObject *slow;                                                                     \
    PyObject *original;                                                                 \
    PyObject *patches;                                                                  \
    PyObject *context_var;                                                              \
    PyObject *suppress_keys; /* tuple */                                                \
    SlotReader enabled;

typedef struct {
    LAYER_HEAD
} LayerHead;

/* counter.c: a count the runner advances without making an int object */
typedef struct {
    PyObject_HEAD
    long long next;
} CounterObject;

/* Move the counter on by one; -1 with OverflowError at the end of its range. */
static inline int
counter_advance(CounterObject *counter)
{
    if (UNLIKELY(counter->next == LLONG_MAX)) {
        PyErr_SetString(PyExc_OverflowError, "Counter reached its maximum");
        return -1;
    }
    counter->next++;
    return 0;
}

/* support.c: arguments, the exception being handled, slot readers, the clock */
INTERNAL PyObject *call_vector(PyObject *fn, CallArgs *ca);
INTERNAL PyObject *call_with_tuple(PyObject *fn, CallArgs *ca);
INTERNAL int callargs_materialize(CallArgs *ca);
INTERNAL void callargs_release(CallArgs *ca);
INTERNAL PyObject *fetch_error(void);
INTERNAL void chain_to_handled(PyObject *type, PyObject *value, PyObject *traceback);
/* The first class on type's MRO whose dict has `name`, as getattr looks: 1 with new
 * references to it and to what it holds there, 0 when none has it, -1 with an error set. */
INTERNAL int mro_find(PyTypeObject *type, PyObject *name, PyObject **definer, PyObject **value);
INTERNAL void slot_reader_for_type(SlotReader *reader, PyTypeObject *type, PyObject *name);
INTERNAL void slot_reader_init(SlotReader *reader, PyObject *obj, PyObject *name);
INTERNAL PyObject *slot_read_generic(SlotReader *reader, PyObject *obj);
INTERNAL int truth_generic(PyObject *value);
INTERNAL int call_method_discard(PyObject *obj, PyObject *name);

/* Call `fn` with the arguments as the caller gave them: a vector (from a compiled layer) or
 * a tuple and a dict (from Python). */
static inline PyObject *
callargs_call(PyObject *fn, CallArgs *ca)
{
    return ca->argv != NULL ? call_vector(fn, ca) : call_with_tuple(fn, ca);
}

/* The helpers every remembered call runs are inline: between two client calls the caches
 * have forgotten this code, and each out-of-line helper is more code to fetch again. */

/* The attribute's value where the reader knows its slot (support.c says why), borrowed;
 * NULL (no error set) when it does not, or the slot is empty: then only getattr can say. */
static inline PyObject *
slot_peek(SlotReader *reader, PyObject *obj)
{
    if (LIKELY(reader->offset >= 0 && Py_TYPE(obj) == reader->type)) {
        return *(PyObject **)((char *)obj + reader->offset);
    }
    return NULL;
}

/* A new reference to the attribute, or NULL with an error set. */
static inline PyObject *
slot_read(SlotReader *reader, PyObject *obj)
{
    PyObject *value = slot_peek(reader, obj);
    return LIKELY(value != NULL) ? Py_NewRef(value) : slot_read_generic(reader, obj);
}

/* The attribute is true; -1 on error. */
static inline int
slot_true(SlotReader *reader, PyObject *obj)
{
    PyObject *value = slot_peek(reader, obj);
    if (LIKELY(value == Py_True)) {
        return 1;
    }
    if (value == Py_False) {
        return 0;
    }
    return truth_generic(slot_read_generic(reader, obj));
}

/* A class's version tag, if it is valid: from 3.11 on CPython gives a class a new one (or
 * none) whenever its attributes or its bases' change and never reuses one, so an equal valid
 * tag means the class is as it was read. 3.10 reuses tags (PyType_ClearCache starts them
 * again from 0): there this says 0, "none", always. */
static inline unsigned int
valid_version_tag(PyTypeObject *type)
{
#if PY_VERSION_HEX < 0x030B0000
    (void)type;
    return 0;
#else
#if PY_VERSION_HEX < 0x030C0000
    if (!(type->tp_flags & Py_TPFLAGS_VALID_VERSION_TAG)) {
        return 0;
    }
#endif
    return type->tp_version_tag;
#endif
}

/* attr_reader.c: one attribute of the instances a layer is called on, read by its slot, or
 * as the instance's type, where getattr's answer is known to be that (attr_reader.c says
 * why and when). */
#define ATTR_GETATTR (-1)
#define ATTR_TYPE (-2)

/* How getattr answers for one type while its version tag is `tag`. */
typedef struct {
    PyTypeObject *type; /* the type learned, or NULL */
    unsigned int tag;   /* its version tag then, never 0 while type is set */
    Py_ssize_t how;     /* >= 0: the slot's offset; ATTR_TYPE; ATTR_GETATTR */
} AttrWay;

typedef struct {
    PyObject *name; /* str, or NULL: no attribute to read */
    AttrWay last;   /* the way of the type read last */
    AttrWay before; /* and of the one before it: a site may serve two cursor classes */
} AttrReader;

INTERNAL void attr_reader_init(AttrReader *reader, PyObject *name);
INTERNAL int attr_reader_traverse(AttrReader *reader, visitproc visit, void *arg);
INTERNAL void attr_reader_clear(AttrReader *reader);
INTERNAL PyObject *attr_read_learning(AttrReader *reader, PyObject *obj);

/* getattr(obj, reader's name): a new reference, or NULL with an error set. */
static inline PyObject *
attr_read(AttrReader *reader, PyObject *obj)
{
    PyTypeObject *type = Py_TYPE(obj);
    AttrWay *way = &reader->last;
    if (LIKELY(type == way->type && valid_version_tag(type) == way->tag)) {
        if (LIKELY(way->how >= 0)) {
            PyObject *value = *(PyObject **)((char *)obj + way->how);
            if (LIKELY(value != NULL)) {
                return Py_NewRef(value);
            }
        }
        else if (way->how == ATTR_TYPE) {
            return Py_NewRef((PyObject *)type);
        }
        return PyObject_GetAttr(obj, reader->name); /* an empty slot raises as getattr does */
    }
    return attr_read_learning(reader, obj);
}

#if HAVE_DIRECT_MONOTONIC
/* time.monotonic(), read here when that is the runner's clock: the same clock and the same
 * conversion as CPython's (Python/pytime.c) on Linux, so values mix with Python's. */
static inline int
direct_monotonic(double *seconds)
{
    struct timespec ts;
    if (UNLIKELY(clock_gettime(CLOCK_MONOTONIC, &ts) != 0)) {
        return -1;
    }
    long long ns = (long long)ts.tv_sec * 1000000000LL + (long long)ts.tv_nsec;
    if (UNLIKELY(ns % 1000000000LL == 0)) {
        *seconds = (double)(ns / 1000000000LL);
    }
    else {
        *seconds = (double)ns / 1e9;
    }
    return 0;
}
#endif

/* runner.c */
INTERNAL int started_read_generic(RunnerObject *self, Started *started);
INTERNAL PyObject *started_object(Started *started);
INTERNAL void runner_release(RunnerObject *self);
INTERNAL int before_bucket_end_generic(RunnerObject *self, Started *started);
INTERNAL int advance_iterator(PyObject *iterator);
INTERNAL int record_success_generic(RunnerObject *self, PyObject *breaker);
INTERNAL PyObject *runner_run(RunnerObject *self, PyObject *fn, CallArgs *ca);
INTERNAL int runner_gate(PyObject *breaker);
INTERNAL int runner_record_call(RunnerObject *self, Started *started);
INTERNAL int runner_remember(RunnerObject *self, PyObject *fn, CallArgs *ca, PyObject *result,
                             Started *started);
INTERNAL PyObject *runner_reject(RunnerObject *self, PyObject *fn, CallArgs *ca,
                                 Started *started);

/* async_run.c: one awaited run of an async Runner, made by a Layer (which decides when it
 * is first awaited, layer_decide; explain says why a failure was not retried) from its
 * vector, or by a Runner from Python's tuple and dict. Neither steals. */
INTERNAL PyObject *async_run_from_layer(PyObject *layer, PyObject *fn, PyObject *const *argv,
                                        Py_ssize_t nargs, PyObject *kwnames,
                                        PyObject *explain);
INTERNAL PyObject *async_run_from_tuple(RunnerObject *runner, PyObject *fn, PyObject *args,
                                        PyObject *kwargs);

/* layer.c: what an async Layer's run decides when first awaited */
INTERNAL PyObject *layer_decide(PyObject *layer, PyObject *const *argv, Py_ssize_t nargs,
                                PyObject *kwnames, PyObject **instead);

/* layer_head.c: "except Exception as error: explain(plan, error); raise" */
INTERNAL PyObject *explain_error(PyObject *explain, PyObject *plan);

/* layer_head.c */
INTERNAL int layer_head_init(LayerHead *head, PyObject *slow, PyObject *original,
                             PyObject *patches, PyObject *context_var,
                             PyObject *suppress_keys);
INTERNAL int layer_head_traverse(LayerHead *head, visitproc visit, void *arg);
INTERNAL void layer_head_clear(LayerHead *head);
INTERNAL PyObject *layer_descr_get(PyObject *self, PyObject *instance, PyObject *owner);
INTERNAL int unsuppressed(PyObject *context_var, PyObject *suppress_keys);
INTERNAL PyObject *layer_call_slow(LayerHead *head, PyObject *const *argv, size_t nargsf,
                                   PyObject *kwnames);
extern INTERNAL PyGetSetDef layer_getset[];

/* the types, one file each; module.c adds them to the module */
extern INTERNAL PyTypeObject RunnerType, PlanTableType, LayerType, HttpLayerType, CounterType,
    AsyncRunType;

/* next(iterator), discarding the value; -1 on error (StopIteration when exhausted). A
 * Counter moves on by one addition. */
static inline int
advance(PyObject *iterator)
{
    if (LIKELY(Py_TYPE(iterator) == &CounterType)) {
        return counter_advance((CounterObject *)iterator);
    }
    return advance_iterator(iterator);
}

/* Where a call through a compiled layer goes first: the original when its PatchSet is
 * disabled, the Python layer when the flag cannot be read; *go_on = 1 (and NULL) otherwise. */
static inline PyObject *
layer_head_gate(LayerHead *head, PyObject *const *argv, size_t nargsf, PyObject *kwnames,
                int *go_on)
{
    *go_on = 0;
    int enabled = slot_true(&head->enabled, head->patches);
    if (enabled == 0) { /* a disabled layer someone still reaches: straight through */
        return PyObject_Vectorcall(head->original, argv, nargsf, kwnames);
    }
    if (enabled < 0) { /* the flag could not be read: the Python layer meets it too */
        PyErr_Clear();
        return layer_call_slow(head, argv, nargsf, kwnames);
    }
    *go_on = 1;
    return NULL;
}

/* The runner's per-call steps, inline (see slot_read); each has a generic way in runner.c. */

/* When the call started, read once. -1 on error. */
static inline int
started_read(RunnerObject *self, Started *started)
{
#if HAVE_DIRECT_MONOTONIC
    if (LIKELY(self->monotonic)) {
        started->value = NULL;
        if (LIKELY(direct_monotonic(&started->seconds) == 0)) {
            return 0;
        }
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
#endif
    return started_read_generic(self, started);
}

/* started < budget._bucket_end; -1 on error. */
static inline int
runner_before_bucket_end(RunnerObject *self, Started *started)
{
    PyObject *end = started->value == NULL ? slot_peek(&self->bucket_end, self->budget) : NULL;
    if (LIKELY(end != NULL && PyFloat_CheckExact(end))) {
        return started->seconds < PyFloat_AS_DOUBLE(end);
    }
    return before_bucket_end_generic(self, started);
}

/* Account the success: next(breaker._tally) when set, else breaker.record_success(). */
static inline int
runner_record_success(RunnerObject *self, PyObject *breaker)
{
    PyObject *tally = self->tallied ? slot_peek(&self->tally, breaker) : NULL;
    if (LIKELY(tally != NULL && Py_TYPE(tally) == &CounterType)) {
        return counter_advance((CounterObject *)tally);
    }
    return record_success_generic(self, breaker);
}

#endif
