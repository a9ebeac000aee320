/* otel_recovery._speedups: the per-call happy path, compiled.
 *
 * Why this exists: the auto-instrumentors promise at most 1 us of CPU per client call, and in
 * CPython every bytecode of a per-call layer costs tens of machine instructions. The Python
 * layer and the Python runner (RecoveryPolicy.runner) spend about 5,800 instructions on a
 * Redis GET; this module does the same work in a few hundred.
 *
 * It is an accelerator, never the source of truth:
 *
 * - Runner mirrors the closure RecoveryPolicy.runner() compiles in Python (_driver_sync.py,
 *   "guarded"), line for line; every case but the happy path calls back into the policy's
 *   Python methods (recover, reject, can_execute, record_call, record_success, release).
 * - Layer handles only the remembered happy case of a per-call patch site: instrumentation
 *   on, nothing suppressed, a plan already remembered for this call's route. Anything else
 *   (the first call, a changed wrapper chain, a suppressed context, an internal surprise)
 *   calls the site's Python layer, which decides, plans and remembers.
 *
 * Without a C compiler the package installs without this module and behaves the same,
 * only slower (otel_recovery/_speedups_loader.py). Tests run both.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <time.h>

static PyObject *str_active, *str_permit_all, *str_tally, *str_bucket_end, *str_can_execute,
    *str_record_call, *str_record_success, *str_release, *str_enabled, *str_seen, *str_run,
    *str_statuses, *str_method, *str_url, *kw_release_false;

/* ------------------------------------------------------------------------------------ */
/* Arguments as the caller gave them: a vector (from a Layer) or a tuple and a dict (from
 * Python). The tuple and dict are built only when a slow path needs them. */

typedef struct {
    PyObject *const *argv;
    Py_ssize_t nargs;
    PyObject *kwnames;
    PyObject *args;   /* tuple, or NULL until materialized */
    PyObject *kwargs; /* dict, or NULL until materialized */
    int owned;        /* args/kwargs were built here and must be released */
} CallArgs;

static PyObject *
callargs_call(PyObject *fn, CallArgs *ca)
{
    if (ca->argv != NULL) {
        return PyObject_Vectorcall(fn, ca->argv, (size_t)ca->nargs, ca->kwnames);
    }
    if (PyDict_GET_SIZE(ca->kwargs) == 0) {
        return PyObject_Call(fn, ca->args, NULL);
    }
    if (PyVectorcall_Function(fn) != NULL) {
        return PyObject_Call(fn, ca->args, ca->kwargs); /* unpacked: the callee gets a copy */
    }
    /* fn(*args, **kwargs) passes a fresh dict: a tp_call callee may mutate what it gets */
    PyObject *copy = PyDict_Copy(ca->kwargs);
    if (copy == NULL) {
        return NULL;
    }
    PyObject *result = PyObject_Call(fn, ca->args, copy);
    Py_DECREF(copy);
    return result;
}

/* The exception being handled at this level of the exception stack, as an except clause
 * sets it (PUSH_EXC_INFO) and puts it back (POP_EXCEPT): only this level, never the
 * topmost one PyErr_GetExcInfo reports from an outer frame of a generator's caller.
 * (3.11 keeps only the value there; 3.10 the type, value and traceback.) */
typedef struct {
    PyObject *value;
#if PY_VERSION_HEX < 0x030B0000
    PyObject *type, *traceback;
#endif
} Handled;

static Handled
handled_push(PyObject *value)
{
    _PyErr_StackItem *item = PyThreadState_Get()->exc_info;
    Handled previous;
    previous.value = item->exc_value;
    item->exc_value = Py_XNewRef(value);
#if PY_VERSION_HEX < 0x030B0000
    previous.type = item->exc_type;
    previous.traceback = item->exc_traceback;
    item->exc_type = value == NULL ? NULL : Py_NewRef((PyObject *)Py_TYPE(value));
    item->exc_traceback = value == NULL ? NULL : PyException_GetTraceback(value);
#endif
    return previous;
}

static void
handled_pop(Handled previous)
{
    _PyErr_StackItem *item = PyThreadState_Get()->exc_info;
    PyObject *current = item->exc_value;
    item->exc_value = previous.value;
    Py_XDECREF(current);
#if PY_VERSION_HEX < 0x030B0000
    PyObject *type = item->exc_type, *traceback = item->exc_traceback;
    item->exc_type = previous.type;
    item->exc_traceback = previous.traceback;
    Py_XDECREF(type);
    Py_XDECREF(traceback);
#endif
}

static int
callargs_materialize(CallArgs *ca)
{
    if (ca->args != NULL) {
        return 0;
    }
    PyObject *args = PyTuple_New(ca->nargs);
    if (args == NULL) {
        return -1;
    }
    for (Py_ssize_t i = 0; i < ca->nargs; i++) {
        Py_INCREF(ca->argv[i]);
        PyTuple_SET_ITEM(args, i, ca->argv[i]);
    }
    PyObject *kwargs = PyDict_New();
    if (kwargs == NULL) {
        Py_DECREF(args);
        return -1;
    }
    Py_ssize_t nkw = ca->kwnames == NULL ? 0 : PyTuple_GET_SIZE(ca->kwnames);
    for (Py_ssize_t i = 0; i < nkw; i++) {
        if (PyDict_SetItem(kwargs, PyTuple_GET_ITEM(ca->kwnames, i), ca->argv[ca->nargs + i]) < 0) {
            Py_DECREF(args);
            Py_DECREF(kwargs);
            return -1;
        }
    }
    ca->args = args;
    ca->kwargs = kwargs;
    ca->owned = 1;
    return 0;
}

static void
callargs_release(CallArgs *ca)
{
    if (ca->owned) {
        Py_CLEAR(ca->args);
        Py_CLEAR(ca->kwargs);
    }
}

/* ------------------------------------------------------------------------------------ */
/* Reading an attribute kept in a __slots__ slot without the attribute protocol.
 *
 * Most of a generic getattr is finding out *where* the attribute lives; for the policy
 * objects of a runner that answer never changes, so it is found once: when the object's
 * class resolves the name to a __slots__ member, the value is read at the member's offset
 * while the object's class is still that class. Anything else uses PyObject_GetAttr. */

typedef struct {
    PyTypeObject *type; /* borrowed: the object the reader was made for keeps it alive */
    Py_ssize_t offset;  /* -1: use PyObject_GetAttr */
    PyObject *name;
} SlotReader;

static void
slot_reader_for_type(SlotReader *reader, PyTypeObject *type, PyObject *name)
{
    reader->type = NULL;
    reader->offset = -1;
    reader->name = name;
    PyObject *mro = type->tp_mro;
    if (type->tp_getattro != PyObject_GenericGetAttr || mro == NULL || !PyTuple_Check(mro)) {
        return;
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(mro); i++) {
        PyObject *base = PyTuple_GET_ITEM(mro, i);
        PyObject *dict = PyType_Check(base) ? ((PyTypeObject *)base)->tp_dict : NULL;
        PyObject *found = dict == NULL ? NULL : PyDict_GetItemWithError(dict, name);
        if (found == NULL) {
            if (PyErr_Occurred()) {
                PyErr_Clear();
                return;
            }
            continue;
        }
        if (Py_TYPE(found) == &PyMemberDescr_Type &&
            PyType_IsSubtype(type, PyDescr_TYPE(found))) {
            PyMemberDef *member = ((PyMemberDescrObject *)found)->d_member;
            if (member->type == T_OBJECT_EX && !(member->flags & READ_RESTRICTED)) {
                reader->type = type;
                reader->offset = member->offset;
            }
        }
        return; /* the first definition on the MRO decides, as getattr's does */
    }
}

static void
slot_reader_init(SlotReader *reader, PyObject *obj, PyObject *name)
{
    if (obj == NULL || obj == Py_None) {
        reader->type = NULL;
        reader->offset = -1;
        reader->name = name;
        return;
    }
    slot_reader_for_type(reader, Py_TYPE(obj), name);
}

/* A new reference to the attribute, or NULL with an error set. */
static PyObject *
slot_read(SlotReader *reader, PyObject *obj)
{
    if (reader->offset >= 0 && Py_TYPE(obj) == reader->type) {
        PyObject *value = *(PyObject **)((char *)obj + reader->offset);
        if (value != NULL) {
            return Py_NewRef(value);
        }
    }
    return PyObject_GetAttr(obj, reader->name);
}

/* The attribute is true; -1 on error. */
static int
slot_true(SlotReader *reader, PyObject *obj)
{
    PyObject *value = slot_read(reader, obj);
    if (value == NULL) {
        return -1;
    }
    int truth = value == Py_True ? 1 : (value == Py_False ? 0 : PyObject_IsTrue(value));
    Py_DECREF(value);
    return truth;
}

/* time.monotonic(), read here when that is the runner's clock: the same clock and the same
 * conversion as CPython's (Python/pytime.c) on Linux, so values mix with Python's. */
static PyObject *time_monotonic;

#if defined(__linux__) && defined(CLOCK_MONOTONIC)
#define HAVE_DIRECT_MONOTONIC 1
static int
direct_monotonic(double *seconds)
{
    struct timespec ts;
    if (clock_gettime(CLOCK_MONOTONIC, &ts) != 0) {
        return -1;
    }
    long long ns = (long long)ts.tv_sec * 1000000000LL + (long long)ts.tv_nsec;
    if (ns % 1000000000LL == 0) {
        *seconds = (double)(ns / 1000000000LL);
    }
    else {
        *seconds = (double)ns / 1e9;
    }
    return 0;
}
#else
#define HAVE_DIRECT_MONOTONIC 0
#endif

/* Call method(), discarding its result; -1 on error. */
static int
call_method_discard(PyObject *obj, PyObject *name)
{
    PyObject *result = PyObject_CallMethodNoArgs(obj, name);
    if (result == NULL) {
        return -1;
    }
    Py_DECREF(result);
    return 0;
}

/* ------------------------------------------------------------------------------------ */
/* Runner */

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
    int gate_unlocked;
    int tallied;
    int monotonic; /* now is time.monotonic: read the clock here */
    SlotReader active, permit_all, tally, bucket_end;
    vectorcallfunc vectorcall;
} RunnerObject;

static PyTypeObject RunnerType;

/* When the call started: read at once as a double, made a float object only for the
 * slow paths that take it. */
typedef struct {
    double seconds;
    PyObject *value; /* NULL until needed */
} Started;

static int
started_read(RunnerObject *self, Started *started)
{
#if HAVE_DIRECT_MONOTONIC
    if (self->monotonic) {
        started->value = NULL;
        return direct_monotonic(&started->seconds) == 0 ? 0 : (PyErr_SetFromErrno(PyExc_OSError), -1);
    }
#endif
    started->value = PyObject_CallNoArgs(self->now);
    if (started->value == NULL) {
        return -1;
    }
    started->seconds = PyFloat_CheckExact(started->value) ? PyFloat_AS_DOUBLE(started->value) : -1.0;
    return 0;
}

/* A borrowed reference to the start time as an object; NULL with an error set. */
static PyObject *
started_object(Started *started)
{
    if (started->value == NULL) {
        started->value = PyFloat_FromDouble(started->seconds);
    }
    return started->value;
}

/* The "except Exception as error: return recover(...)" branch: the error is the exception
 * being handled while recover runs, so what recover raises chains to it as in Python. */
static PyObject *
runner_recover(RunnerObject *self, PyObject *fn, CallArgs *ca, Started *started)
{
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    PyErr_NormalizeException(&type, &value, &traceback);
    if (traceback != NULL) {
        PyException_SetTraceback(value, traceback);
    }
    PyObject *result = NULL;
    Handled saved = handled_push(value);
    PyObject *start = started_object(started);
    PyObject *ended = start == NULL ? NULL : PyObject_CallNoArgs(self->now);
    PyObject *took = ended == NULL ? NULL : PyNumber_Subtract(ended, start);
    Py_XDECREF(ended);
    if (took != NULL && callargs_materialize(ca) == 0) {
        PyObject *call_args[6] = {fn, ca->args, ca->kwargs, value, start, took};
        result = PyObject_Vectorcall(self->recover, call_args, 6, NULL);
    }
    Py_XDECREF(took);
    handled_pop(saved);
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(traceback);
    return result;
}

/* "except BaseException: breaker.release(); raise". */
static void
runner_release(RunnerObject *self)
{
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    if (call_method_discard(self->breaker, str_release) == 0) {
        PyErr_Restore(type, value, traceback);
        return;
    }
    /* release() failed: its error propagates, chained to the original, as in Python */
    PyErr_NormalizeException(&type, &value, &traceback);
    if (traceback != NULL) {
        PyException_SetTraceback(value, traceback);
    }
    PyObject *new_type, *new_value, *new_traceback;
    PyErr_Fetch(&new_type, &new_value, &new_traceback);
    PyErr_NormalizeException(&new_type, &new_value, &new_traceback);
    if (new_value != value) {
        PyException_SetContext(new_value, value); /* steals value */
    }
    else {
        Py_DECREF(value);
    }
    Py_XDECREF(type);
    Py_XDECREF(traceback);
    PyErr_Restore(new_type, new_value, new_traceback);
}

static PyObject *
runner_reject(RunnerObject *self, CallArgs *ca, Started *started)
{
    PyObject *start = started_object(started);
    if (start == NULL || callargs_materialize(ca) < 0) {
        return NULL;
    }
    PyObject *error = PyObject_CallNoArgs(self->rejection);
    if (error == NULL) {
        return NULL;
    }
    PyObject *call_args[5] = {error, start, ca->args, ca->kwargs, Py_False};
    PyObject *result = PyObject_Vectorcall(self->reject, call_args, 4, kw_release_false);
    Py_DECREF(error);
    return result;
}

/* started < budget._bucket_end; -1 on error. */
static int
runner_before_bucket_end(RunnerObject *self, Started *started)
{
    PyObject *end = slot_read(&self->bucket_end, self->budget);
    if (end == NULL) {
        return -1;
    }
    int before;
    if (PyFloat_CheckExact(end) && (started->value == NULL || PyFloat_CheckExact(started->value))) {
        before = started->seconds < PyFloat_AS_DOUBLE(end);
    }
    else {
        PyObject *start = started_object(started);
        before = start == NULL ? -1 : PyObject_RichCompareBool(start, end, Py_LT);
    }
    Py_DECREF(end);
    return before;
}

/* next(iterator), discarding the value; -1 on error (StopIteration when exhausted). */
static int
advance(PyObject *iterator)
{
    if (!PyIter_Check(iterator)) {
        PyErr_Format(PyExc_TypeError, "'%.200s' object is not an iterator",
                     Py_TYPE(iterator)->tp_name);
        return -1;
    }
    PyObject *value = PyIter_Next(iterator);
    if (value == NULL) {
        if (!PyErr_Occurred()) {
            PyErr_SetNone(PyExc_StopIteration);
        }
        return -1;
    }
    Py_DECREF(value);
    return 0;
}

/* Account the success: next(breaker._tally) when set, else breaker.record_success(). */
static int
runner_record_success(RunnerObject *self, PyObject *breaker)
{
    if (self->tallied) {
        PyObject *tally = slot_read(&self->tally, breaker);
        if (tally == NULL) {
            return -1;
        }
        if (tally != Py_None) {
            int counted = advance(tally);
            Py_DECREF(tally);
            return counted;
        }
        Py_DECREF(tally);
    }
    return call_method_discard(breaker, str_record_success);
}

static PyObject *
runner_run(RunnerObject *self, PyObject *fn, CallArgs *ca)
{
    int active = slot_true(&self->active, self->switches);
    if (active < 0) {
        return NULL;
    }
    if (!active) {
        return callargs_call(fn, ca);
    }
    Started started;
    if (started_read(self, &started) < 0) {
        return NULL;
    }
    PyObject *result = NULL;
    PyObject *breaker = self->breaker == Py_None ? NULL : self->breaker;
    if (breaker != NULL) {
        int permitted = self->gate_unlocked ? slot_true(&self->permit_all, breaker) : 0;
        if (permitted < 0) {
            goto done;
        }
        if (!permitted) {
            PyObject *answer = PyObject_CallMethodNoArgs(breaker, str_can_execute);
            if (answer == NULL) {
                goto done;
            }
            permitted = PyObject_IsTrue(answer);
            Py_DECREF(answer);
            if (permitted < 0) {
                goto done;
            }
            if (!permitted) {
                result = runner_reject(self, ca, &started);
                goto done;
            }
        }
    }
    if (self->budget != Py_None) {
        int deposited = 0;
        if (self->counter != Py_None) {
            int before = runner_before_bucket_end(self, &started);
            if (before < 0) {
                goto done;
            }
            if (before) {
                if (advance(self->counter) < 0) {
                    goto done;
                }
                deposited = 1;
            }
        }
        if (!deposited) {
            PyObject *start = started_object(&started);
            PyObject *ignored =
                start == NULL ? NULL
                              : PyObject_CallMethodOneArg(self->budget, str_record_call, start);
            if (ignored == NULL) {
                goto done;
            }
            Py_DECREF(ignored);
        }
    }
    result = callargs_call(fn, ca);
    if (result == NULL) {
        if (PyErr_ExceptionMatches(PyExc_Exception)) {
            result = runner_recover(self, fn, ca, &started);
        }
        else if (breaker != NULL) {
            runner_release(self);
        }
        goto done;
    }
    if (breaker != NULL && runner_record_success(self, breaker) < 0) {
        Py_CLEAR(result);
        goto done;
    }
    if (self->remember != Py_None) {
        PyObject *start = started_object(&started);
        if (start == NULL || callargs_materialize(ca) < 0) {
            Py_CLEAR(result);
            goto done;
        }
        PyObject *call_args[4] = {ca->args, ca->kwargs, result, start};
        PyObject *ignored = PyObject_Vectorcall(self->remember, call_args, 4, NULL);
        if (ignored == NULL) {
            Py_CLEAR(result);
            goto done;
        }
        Py_DECREF(ignored);
    }
done:
    Py_XDECREF(started.value);
    return result;
}

static PyObject *
runner_vectorcall(RunnerObject *self, PyObject *const *argv, size_t nargsf, PyObject *kwnames)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (nargs != 3 || (kwnames != NULL && PyTuple_GET_SIZE(kwnames) != 0)) {
        PyErr_SetString(PyExc_TypeError, "a runner is called as run(fn, args, kwargs)");
        return NULL;
    }
    if (!PyTuple_Check(argv[1]) || !PyDict_Check(argv[2])) {
        PyErr_SetString(PyExc_TypeError,
                        "run(fn, args, kwargs) takes args as a tuple and kwargs as a dict");
        return NULL;
    }
    CallArgs ca = {NULL, 0, NULL, argv[1], argv[2], 0};
    return runner_run(self, argv[0], &ca);
}

static PyObject *
runner_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *names[] = {"switches", "now", "breaker", "gate_unlocked", "tallied", "budget",
                            "counter", "remember", "recover", "reject", "rejection", NULL};
    PyObject *switches, *now, *breaker, *budget, *counter, *remember, *recover, *reject,
        *rejection;
    int gate_unlocked, tallied;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOppOOOOOO:Runner", names, &switches, &now,
                                     &breaker, &gate_unlocked, &tallied, &budget, &counter,
                                     &remember, &recover, &reject, &rejection)) {
        return NULL;
    }
    if (counter != Py_None && !PyIter_Check(counter)) {
        PyErr_SetString(PyExc_TypeError, "Runner counter must be an iterator or None");
        return NULL;
    }
    RunnerObject *self = PyObject_GC_New(RunnerObject, type);
    if (self == NULL) {
        return NULL;
    }
    self->switches = Py_NewRef(switches);
    self->now = Py_NewRef(now);
    self->breaker = Py_NewRef(breaker);
    self->budget = Py_NewRef(budget);
    self->counter = Py_NewRef(counter);
    self->remember = Py_NewRef(remember);
    self->recover = Py_NewRef(recover);
    self->reject = Py_NewRef(reject);
    self->rejection = Py_NewRef(rejection);
    self->gate_unlocked = gate_unlocked;
    self->tallied = tallied;
    self->monotonic = HAVE_DIRECT_MONOTONIC && now == time_monotonic;
    slot_reader_init(&self->active, switches, str_active);
    slot_reader_init(&self->permit_all, breaker, str_permit_all);
    slot_reader_init(&self->tally, breaker, str_tally);
    slot_reader_init(&self->bucket_end, budget, str_bucket_end);
    self->vectorcall = (vectorcallfunc)runner_vectorcall;
    PyObject_GC_Track(self);
    return (PyObject *)self;
}

static int
runner_traverse(RunnerObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->switches);
    Py_VISIT(self->now);
    Py_VISIT(self->breaker);
    Py_VISIT(self->budget);
    Py_VISIT(self->counter);
    Py_VISIT(self->remember);
    Py_VISIT(self->recover);
    Py_VISIT(self->reject);
    Py_VISIT(self->rejection);
    return 0;
}

static int
runner_clear(RunnerObject *self)
{
    Py_CLEAR(self->switches);
    Py_CLEAR(self->now);
    Py_CLEAR(self->breaker);
    Py_CLEAR(self->budget);
    Py_CLEAR(self->counter);
    Py_CLEAR(self->remember);
    Py_CLEAR(self->recover);
    Py_CLEAR(self->reject);
    Py_CLEAR(self->rejection);
    return 0;
}

static void
runner_dealloc(RunnerObject *self)
{
    PyObject_GC_UnTrack(self);
    runner_clear(self);
    PyObject_GC_Del(self);
}

static PyTypeObject RunnerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "otel_recovery._speedups.Runner",
    .tp_doc = PyDoc_STR("run(fn, args, kwargs): RecoveryPolicy.runner()'s happy path, compiled."),
    .tp_basicsize = sizeof(RunnerObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_new = runner_new,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(RunnerObject, vectorcall),
    .tp_traverse = (traverseproc)runner_traverse,
    .tp_clear = (inquiry)runner_clear,
    .tp_dealloc = (destructor)runner_dealloc,
};

/* ------------------------------------------------------------------------------------ */
/* PlanTable: the plans a Layer may use for one holder (a Redis pool, a psycopg connection),
 * valid while its token is the layer's token and guard_map[guard_key] is guard_value. */

typedef struct {
    PyObject_HEAD
    PyObject *token;
    PyObject *plans; /* dict: route key -> Plan */
    PyObject *guard_map;
    PyObject *guard_key;
    PyObject *guard_value;
} PlanTableObject;

static PyTypeObject PlanTableType;

static PyObject *
plantable_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *names[] = {"token", "plans", "guard_map", "guard_key", "guard_value", NULL};
    PyObject *token, *plans, *guard_map = Py_None, *guard_key = Py_None, *guard_value = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO!|OOO:PlanTable", names, &token,
                                     &PyDict_Type, &plans, &guard_map, &guard_key,
                                     &guard_value)) {
        return NULL;
    }
    if (guard_map != Py_None && !PyDict_Check(guard_map)) {
        PyErr_SetString(PyExc_TypeError, "PlanTable guard_map must be a dict or None");
        return NULL;
    }
    PlanTableObject *self = PyObject_GC_New(PlanTableObject, type);
    if (self == NULL) {
        return NULL;
    }
    self->token = Py_NewRef(token);
    self->plans = Py_NewRef(plans);
    self->guard_map = Py_NewRef(guard_map);
    self->guard_key = Py_NewRef(guard_key);
    self->guard_value = Py_NewRef(guard_value);
    PyObject_GC_Track(self);
    return (PyObject *)self;
}

static int
plantable_traverse(PlanTableObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->token);
    Py_VISIT(self->plans);
    Py_VISIT(self->guard_map);
    Py_VISIT(self->guard_key);
    Py_VISIT(self->guard_value);
    return 0;
}

static int
plantable_clear(PlanTableObject *self)
{
    Py_CLEAR(self->token);
    Py_CLEAR(self->plans);
    Py_CLEAR(self->guard_map);
    Py_CLEAR(self->guard_key);
    Py_CLEAR(self->guard_value);
    return 0;
}

static void
plantable_dealloc(PlanTableObject *self)
{
    PyObject_GC_UnTrack(self);
    plantable_clear(self);
    PyObject_GC_Del(self);
}

static PyMemberDef plantable_members[] = {
    {"token", T_OBJECT, offsetof(PlanTableObject, token), READONLY, NULL},
    {"plans", T_OBJECT, offsetof(PlanTableObject, plans), READONLY, NULL},
    {"guard_map", T_OBJECT, offsetof(PlanTableObject, guard_map), READONLY, NULL},
    {"guard_key", T_OBJECT, offsetof(PlanTableObject, guard_key), READONLY, NULL},
    {"guard_value", T_OBJECT, offsetof(PlanTableObject, guard_value), READONLY, NULL},
    {NULL},
};

static PyTypeObject PlanTableType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "otel_recovery._speedups.PlanTable",
    .tp_doc = PyDoc_STR("PlanTable(token, plans, guard_map=None, guard_key=None, "
                        "guard_value=None): plans a Layer may use for one holder."),
    .tp_basicsize = sizeof(PlanTableObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = plantable_new,
    .tp_members = plantable_members,
    .tp_traverse = (traverseproc)plantable_traverse,
    .tp_clear = (inquiry)plantable_clear,
    .tp_dealloc = (destructor)plantable_dealloc,
};

/* ------------------------------------------------------------------------------------ */
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

static int
layer_head_init(LayerHead *head, PyObject *slow, PyObject *original, PyObject *patches,
                PyObject *context_var, PyObject *suppress_keys)
{
    if (!PyContextVar_CheckExact(context_var)) {
        PyErr_SetString(PyExc_TypeError, "a layer's context_var must be a contextvars.ContextVar");
        return -1;
    }
    if (!PyTuple_Check(suppress_keys)) {
        PyErr_SetString(PyExc_TypeError, "a layer's suppress_keys must be a tuple");
        return -1;
    }
    head->dict = NULL;
    head->slow = Py_NewRef(slow);
    head->original = Py_NewRef(original);
    head->patches = Py_NewRef(patches);
    head->context_var = Py_NewRef(context_var);
    head->suppress_keys = Py_NewRef(suppress_keys);
    slot_reader_init(&head->enabled, patches, str_enabled);
    return 0;
}

static int
layer_head_traverse(LayerHead *head, visitproc visit, void *arg)
{
    Py_VISIT(head->dict);
    Py_VISIT(head->slow);
    Py_VISIT(head->original);
    Py_VISIT(head->patches);
    Py_VISIT(head->context_var);
    Py_VISIT(head->suppress_keys);
    return 0;
}

static void
layer_head_clear(LayerHead *head)
{
    Py_CLEAR(head->dict);
    Py_CLEAR(head->slow);
    Py_CLEAR(head->original);
    Py_CLEAR(head->patches);
    Py_CLEAR(head->context_var);
    Py_CLEAR(head->suppress_keys);
}

/* Bound like a function: on an instance, a method; on the class, itself. */
static PyObject *
layer_descr_get(PyObject *self, PyObject *instance, PyObject *owner)
{
    if (instance == NULL || instance == Py_None) {
        return Py_NewRef(self);
    }
    return PyMethod_New(self, instance);
}

static PyObject *
layer_get_slow(LayerHead *self, void *closure)
{
    return Py_NewRef(self->slow);
}

static PyObject *
layer_get_original(LayerHead *self, void *closure)
{
    return Py_NewRef(self->original);
}

static PyGetSetDef layer_getset[] = {
    {"__dict__", PyObject_GenericGetDict, PyObject_GenericSetDict, NULL, NULL},
    {"slow", (getter)layer_get_slow, NULL, "the Python layer: every case but the remembered",
     NULL},
    {"original", (getter)layer_get_original, NULL, "what the layer calls to go on", NULL},
    {NULL},
};

/* ------------------------------------------------------------------------------------ */
/* Layer: a method-like patch site whose remembered happy path runs here. */

typedef struct {
    LAYER_HEAD
    PyObject *site;          /* Py_None, or an object whose .seen is (top, mode) */
    PyObject *owner;         /* the class holding the patched attribute (with site) */
    PyObject *attribute;
    PyObject *token; /* the table token when there is no site */
    PyObject *holder_attr;
    PyObject *table_attr;
    Py_ssize_t key_index; /* >= 1: argument key_index; 0: the instance's type */
    PyObject *explain;
    SlotReader seen;
    vectorcallfunc vectorcall;
} LayerObject;

static PyTypeObject LayerType;

/* The plan for this call from its holder's table, a new reference; NULL (no error set) when
 * the Python layer has to decide. */
static PyObject *
layer_remembered_plan(LayerObject *self, PyObject *const *argv, Py_ssize_t nargs)
{
    PyObject *token, *seen = NULL, *holder = NULL, *table = NULL, *plan = NULL;
    if (nargs < 1 || self->key_index >= nargs) {
        return NULL;
    }
    if (self->site != Py_None) {
        /* the wrapper chain above us is the one the site last saw */
        seen = slot_read(&self->seen, self->site);
        if (seen == NULL || !PyTuple_Check(seen) || PyTuple_GET_SIZE(seen) != 2) {
            goto miss;
        }
        PyObject *top = PyDict_GetItemWithError(((PyTypeObject *)self->owner)->tp_dict,
                                                self->attribute); /* borrowed */
        if (top == NULL || top != PyTuple_GET_ITEM(seen, 0)) {
            goto miss;
        }
        token = seen;
    }
    else {
        token = self->token;
    }
    holder = PyObject_GetAttr(argv[0], self->holder_attr);
    if (holder == NULL) {
        goto miss;
    }
    table = PyObject_GetAttr(holder, self->table_attr);
    if (table == NULL || Py_TYPE(table) != &PlanTableType) {
        goto miss;
    }
    PlanTableObject *plans = (PlanTableObject *)table;
    if (plans->token != token) {
        goto miss;
    }
    if (plans->guard_map != Py_None) {
        PyObject *guard = PyDict_GetItemWithError(plans->guard_map, plans->guard_key);
        if (guard == NULL && !PyErr_Occurred()) {
            guard = Py_None; /* guard_map.get(guard_key), as the Python layer reads it */
        }
        if (guard != plans->guard_value) {
            goto miss;
        }
    }
    PyObject *key = self->key_index ? argv[self->key_index] : (PyObject *)Py_TYPE(argv[0]);
    plan = PyDict_GetItemWithError(plans->plans, key); /* borrowed */
    if (plan != NULL && PyTuple_Check(plan) && PyTuple_GET_SIZE(plan) > 2 &&
        Py_TYPE(PyTuple_GET_ITEM(plan, 2)) == &RunnerType) {
        Py_INCREF(plan);
    }
    else {
        plan = NULL;
    }
miss:
    if (PyErr_Occurred()) {
        PyErr_Clear(); /* the Python layer meets the same surprise and reports it */
    }
    Py_XDECREF(seen);
    Py_XDECREF(holder);
    Py_XDECREF(table);
    return plan;
}

/* Nothing in the context suppresses instrumentation: 1; something may: 0. */
static int
unsuppressed(PyObject *context_var, PyObject *suppress_keys)
{
    PyObject *context;
    if (PyContextVar_Get(context_var, NULL, &context) < 0) {
        PyErr_Clear();
        return 0;
    }
    if (context == NULL || !PyDict_Check(context)) {
        Py_XDECREF(context);
        return 0;
    }
    int clear = 1;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(suppress_keys); i++) {
        int found = PyDict_Contains(context, PyTuple_GET_ITEM(suppress_keys, i));
        if (found != 0) {
            PyErr_Clear();
            clear = 0;
            break;
        }
    }
    Py_DECREF(context);
    return clear;
}

static PyObject *
layer_vectorcall(LayerObject *self, PyObject *const *argv, size_t nargsf, PyObject *kwnames)
{
    int enabled = slot_true(&self->enabled, self->patches);
    if (enabled == 0) {
        return PyObject_Vectorcall(self->original, argv, nargsf, kwnames);
    }
    if (enabled < 0) {
        PyErr_Clear();
        return PyObject_Vectorcall(self->slow, argv, nargsf, kwnames);
    }
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    PyObject *plan = unsuppressed(self->context_var, self->suppress_keys)
                         ? layer_remembered_plan(self, argv, nargs)
                         : NULL;
    if (plan == NULL) {
        return PyObject_Vectorcall(self->slow, argv, nargsf, kwnames);
    }
    CallArgs ca = {argv, nargs, kwnames, NULL, NULL, 0};
    RunnerObject *runner = (RunnerObject *)PyTuple_GET_ITEM(plan, 2);
    PyObject *result = runner_run(runner, self->original, &ca);
    callargs_release(&ca);
    if (result == NULL && PyErr_ExceptionMatches(PyExc_Exception)) {
        /* "except Exception as error: explain_no_retry(plan, error); raise" */
        PyObject *type, *value, *traceback;
        PyErr_Fetch(&type, &value, &traceback);
        PyErr_NormalizeException(&type, &value, &traceback);
        if (traceback != NULL) {
            PyException_SetTraceback(value, traceback);
        }
        PyObject *call_args[2] = {plan, value};
        PyObject *ignored = PyObject_Vectorcall(self->explain, call_args, 2, NULL);
        if (ignored == NULL && !PyErr_ExceptionMatches(PyExc_Exception)) {
            /* as in Python: a BaseException from explain replaces the error, chained to it */
            PyObject *new_type, *new_value, *new_traceback;
            PyErr_Fetch(&new_type, &new_value, &new_traceback);
            PyErr_NormalizeException(&new_type, &new_value, &new_traceback);
            if (new_value != value) {
                PyException_SetContext(new_value, value); /* steals value */
            }
            else {
                Py_DECREF(value);
            }
            Py_XDECREF(type);
            Py_XDECREF(traceback);
            PyErr_Restore(new_type, new_value, new_traceback);
            Py_DECREF(plan);
            return NULL;
        }
        if (ignored == NULL) {
            PyErr_Clear(); /* telemetry must never replace the caller's error */
        }
        Py_XDECREF(ignored);
        PyErr_Restore(type, value, traceback);
    }
    Py_DECREF(plan);
    return result;
}

static PyObject *
layer_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *names[] = {"slow",   "original",    "patches",    "context_var",
                            "suppress_keys", "site", "owner", "attribute",
                            "token",  "holder_attr", "table_attr", "key_index",
                            "explain", NULL};
    PyObject *slow, *original, *patches, *context_var, *suppress_keys, *site, *owner,
        *attribute, *token, *holder_attr, *table_attr, *explain;
    Py_ssize_t key_index;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOO!OOOOUUnO:Layer", names, &slow,
                                     &original, &patches, &context_var, &PyTuple_Type,
                                     &suppress_keys, &site, &owner, &attribute, &token,
                                     &holder_attr, &table_attr, &key_index, &explain)) {
        return NULL;
    }
    if (site != Py_None && (!PyType_Check(owner) || ((PyTypeObject *)owner)->tp_dict == NULL ||
                            !PyUnicode_Check(attribute))) {
        PyErr_SetString(PyExc_TypeError,
                        "Layer with a site needs owner (the class) and attribute (a str)");
        return NULL;
    }
    if (key_index < 0) {
        PyErr_SetString(PyExc_ValueError, "Layer key_index must be 0 (the type) or positive");
        return NULL;
    }
    LayerObject *self = PyObject_GC_New(LayerObject, type);
    if (self == NULL) {
        return NULL;
    }
    if (layer_head_init((LayerHead *)self, slow, original, patches, context_var,
                        suppress_keys) < 0) {
        PyObject_GC_Del(self);
        return NULL;
    }
    self->site = Py_NewRef(site);
    self->owner = Py_NewRef(owner);
    self->attribute = Py_NewRef(attribute);
    self->token = Py_NewRef(token);
    self->holder_attr = Py_NewRef(holder_attr);
    self->table_attr = Py_NewRef(table_attr);
    self->key_index = key_index;
    self->explain = Py_NewRef(explain);
    slot_reader_init(&self->seen, site, str_seen);
    self->vectorcall = (vectorcallfunc)layer_vectorcall;
    PyObject_GC_Track(self);
    return (PyObject *)self;
}

static int
layer_traverse(LayerObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->site);
    Py_VISIT(self->owner);
    Py_VISIT(self->attribute);
    Py_VISIT(self->token);
    Py_VISIT(self->holder_attr);
    Py_VISIT(self->table_attr);
    Py_VISIT(self->explain);
    return layer_head_traverse((LayerHead *)self, visit, arg);
}

static int
layer_clear(LayerObject *self)
{
    layer_head_clear((LayerHead *)self);
    Py_CLEAR(self->site);
    Py_CLEAR(self->owner);
    Py_CLEAR(self->attribute);
    Py_CLEAR(self->token);
    Py_CLEAR(self->holder_attr);
    Py_CLEAR(self->table_attr);
    Py_CLEAR(self->explain);
    return 0;
}

static void
layer_dealloc(LayerObject *self)
{
    PyObject_GC_UnTrack(self);
    layer_clear(self);
    PyObject_GC_Del(self);
}

static PyTypeObject LayerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "otel_recovery._speedups.Layer",
    .tp_doc = PyDoc_STR("A per-call patch site whose remembered happy path is compiled."),
    .tp_basicsize = sizeof(LayerObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL |
                Py_TPFLAGS_METHOD_DESCRIPTOR,
    .tp_new = layer_new,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(LayerObject, vectorcall),
    .tp_dictoffset = offsetof(LayerObject, dict),
    .tp_descr_get = layer_descr_get,
    .tp_getset = layer_getset,
    .tp_getattro = PyObject_GenericGetAttr,
    .tp_setattro = PyObject_GenericSetAttr,
    .tp_traverse = (traverseproc)layer_traverse,
    .tp_clear = (inquiry)layer_clear,
    .tp_dealloc = (destructor)layer_dealloc,
};

/* ------------------------------------------------------------------------------------ */
/* HttpLayer: Session.request-like sites, (self, method, url, **options) or (self, **options)
 * with method= and url=. The remembered happy path is the first attempt of a request whose
 * plan is remembered under (method, url), that
 * the breaker and budget admit lock-free and that gets a response with a status not to
 * retry on. A first attempt that fails hands its outcome to the site's Python `resume`,
 * which goes on exactly as the Python layer would after that attempt; a request that does
 * not qualify before anything happened runs the Python layer (`slow`) whole. */

typedef struct {
    LAYER_HEAD
    PyObject *shapes;           /* dict: (method, url) -> plan */
    PyObject *plan_type;        /* the plans' class: run and statuses are read from slots */
    PyObject *body_names;       /* tuple of str: options that send a body unless None */
    PyObject *status_attribute; /* str */
    PyObject *signal;           /* signal(response) -> the error to retry on, or None */
    PyObject *unreadable;       /* unreadable(error): a status that cannot be judged */
    PyObject *resume;           /* resume(plan, outcomes, error, started, took, args, kwargs) */
    PyObject *settle;           /* settle(outcomes, raised, value, args, kwargs) */
    SlotReader run, statuses;
    vectorcallfunc vectorcall;
} HttpLayerObject;

static PyTypeObject HttpLayerType;

/* Two keyword names are the same str. Names in code are interned, so two interned names
 * that are different objects differ, without comparing characters. */
static int
same_name(PyObject *given, PyObject *name)
{
    if (given == name) {
        return 1;
    }
    if (PyUnicode_CHECK_INTERNED(given) && PyUnicode_CHECK_INTERNED(name)) {
        return 0;
    }
    return PyUnicode_Compare(given, name) == 0;
}

/* An option that sends a body is set: the plan depends on it, so Python decides. */
static int
http_sends_body(HttpLayerObject *self, PyObject *const *values, PyObject *kwnames)
{
    Py_ssize_t count = kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames);
    for (Py_ssize_t i = 0; i < count; i++) {
        if (values[i] == Py_None) {
            continue;
        }
        PyObject *name = PyTuple_GET_ITEM(kwnames, i);
        for (Py_ssize_t j = 0; j < PyTuple_GET_SIZE(self->body_names); j++) {
            PyObject *body = PyTuple_GET_ITEM(self->body_names, j);
            if (same_name(name, body)) {
                return 1;
            }
        }
    }
    return 0;
}

/* The value of keyword option `name`, borrowed; None when it is not given. */
static PyObject *
keyword(PyObject *const *values, PyObject *kwnames, PyObject *name)
{
    Py_ssize_t count = kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames);
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *given = PyTuple_GET_ITEM(kwnames, i);
        if (same_name(given, name)) {
            return values[i];
        }
    }
    return Py_None;
}

/* The plan remembered for the request's (method, url), a new reference; NULL (no error
 * set) if none. session.get(url) passes them positionally, requests.get(url) by name. */
static PyObject *
http_remembered_plan(HttpLayerObject *self, PyObject *const *argv, Py_ssize_t nargs,
                     PyObject *kwnames)
{
    PyObject *shape = nargs == 3 ? PyTuple_Pack(2, argv[1], argv[2])
                                 : PyTuple_Pack(2, keyword(argv + 1, kwnames, str_method),
                                                keyword(argv + 1, kwnames, str_url));
    if (shape == NULL) {
        PyErr_Clear();
        return NULL;
    }
    PyObject *plan = PyDict_GetItemWithError(self->shapes, shape); /* borrowed */
    Py_DECREF(shape);
    if (plan == NULL || (PyObject *)Py_TYPE(plan) != self->plan_type) {
        PyErr_Clear(); /* an unhashable URL: Python reports it the same way */
        return NULL;
    }
    return Py_NewRef(plan);
}

/* The response's status is one to retry on; a status that cannot be judged is reported
 * and is not (as HttpSite.attempt does). -1 on error. */
static int
http_failed(HttpLayerObject *self, PyObject *response, PyObject *statuses)
{
    PyObject *status = PyObject_GetAttr(response, self->status_attribute);
    if (status == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_AttributeError)) {
            goto unreadable;
        }
        PyErr_Clear();
        status = Py_NewRef(Py_None);
    }
    int failed = PySet_Contains(statuses, status);
    Py_DECREF(status);
    if (failed >= 0) {
        return failed;
    }
unreadable:
    if (!PyErr_ExceptionMatches(PyExc_Exception)) {
        return -1;
    }
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    PyErr_NormalizeException(&type, &value, &traceback);
    if (traceback != NULL) {
        PyException_SetTraceback(value, traceback);
    }
    PyObject *reported = PyObject_CallOneArg(self->unreadable, value);
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(traceback);
    if (reported == NULL) {
        return -1;
    }
    Py_DECREF(reported);
    return 0;
}

/* [outcome]: the list an attempt's outcomes go in, a new reference; NULL on error. */
static PyObject *
http_outcomes(PyObject *outcome)
{
    PyObject *outcomes = PyList_New(outcome == NULL ? 0 : 1);
    if (outcomes != NULL && outcome != NULL) {
        PyList_SET_ITEM(outcomes, 0, Py_NewRef(outcome));
    }
    return outcomes;
}

/* What the Python layer does once the runner returned `value` (raised == 0) or raised it:
 * settle(outcomes, raised, value, args, kwargs), with the caller's exception state as it
 * is (the layer's `deliver` runs outside any handler). Steals `outcomes` and `value`. */
static PyObject *
http_settle(HttpLayerObject *self, PyObject *outcomes, int raised, PyObject *value, CallArgs *ca)
{
    PyObject *result = NULL;
    if (outcomes != NULL && value != NULL && callargs_materialize(ca) == 0) {
        PyObject *call_args[5] = {outcomes, raised ? Py_True : Py_False, value, ca->args,
                                  ca->kwargs};
        result = PyObject_Vectorcall(self->settle, call_args, 5, NULL);
    }
    Py_XDECREF(outcomes);
    Py_XDECREF(value);
    return result;
}

/* The pending error, normalized with its traceback; a new reference. */
static PyObject *
fetch_error(void)
{
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    PyErr_NormalizeException(&type, &value, &traceback);
    if (traceback != NULL) {
        PyException_SetTraceback(value, traceback);
    }
    Py_XDECREF(type);
    Py_XDECREF(traceback);
    return value;
}

/* "The runner raised" at the point where the pending error arose: settle(raised=True). */
static PyObject *
http_settle_pending(HttpLayerObject *self, PyObject *outcome, CallArgs *ca)
{
    PyObject *error = fetch_error();
    return http_settle(self, http_outcomes(outcome), 1, error, ca);
}

/* The first attempt failed (`error`; `response` is the failed response, or NULL when the
 * original raised): as the runner's `except Exception`, resume(...) runs plan.recover with
 * `error` being handled; then settle(...) runs the rest of the layer outside that handler.
 * Steals `error`. */
static PyObject *
http_resume(HttpLayerObject *self, RunnerObject *runner, PyObject *plan, PyObject *error,
            PyObject *response, Started *started, CallArgs *ca)
{
    PyObject *outcomes = http_outcomes(response != NULL ? response : error);
    if (outcomes == NULL) {
        Py_DECREF(error);
        return NULL;
    }
    Handled saved = handled_push(error);
    PyObject *result = NULL, *took = NULL;
    PyObject *start = started_object(started);
    PyObject *ended = start == NULL ? NULL : PyObject_CallNoArgs(runner->now);
    if (ended != NULL) {
        took = PyNumber_Subtract(ended, start);
        Py_DECREF(ended);
    }
    if (took != NULL && callargs_materialize(ca) == 0) {
        PyObject *call_args[7] = {plan, outcomes, error, start, took, ca->args, ca->kwargs};
        result = PyObject_Vectorcall(self->resume, call_args, 7, NULL);
    }
    Py_XDECREF(took);
    handled_pop(saved);
    Py_DECREF(error);
    if (result == NULL) {
        return http_settle(self, outcomes, 1, fetch_error(), ca);
    }
    return http_settle(self, outcomes, 0, result, ca);
}

/* The remembered first attempt. *taken is 0 when nothing happened and the Python layer
 * must run the request instead. Once something happened, every outcome goes the way the
 * Python layer's would: errors of our own steps included. */
static PyObject *
http_first_attempt(HttpLayerObject *self, PyObject *plan, CallArgs *ca, int *taken)
{
    *taken = 0;
    PyObject *result = NULL;
    PyObject *run = slot_read(&self->run, plan);
    PyObject *statuses = run == NULL ? NULL : slot_read(&self->statuses, plan);
    if (statuses == NULL || Py_TYPE(run) != &RunnerType || !PyAnySet_Check(statuses)) {
        goto not_taken;
    }
    RunnerObject *runner = (RunnerObject *)run;
    PyObject *breaker = runner->breaker == Py_None ? NULL : runner->breaker;
    /* admitted without a side effect, or Python decides */
    if (runner->remember != Py_None || slot_true(&runner->active, runner->switches) != 1) {
        goto not_taken;
    }
    if (breaker != NULL &&
        !(runner->gate_unlocked && slot_true(&runner->permit_all, breaker) == 1)) {
        goto not_taken;
    }
    Started started;
    if (started_read(runner, &started) < 0) {
        goto not_taken;
    }
    if (runner->budget != Py_None &&
        (runner->counter == Py_None || runner_before_bucket_end(runner, &started) != 1)) {
        Py_XDECREF(started.value);
        goto not_taken;
    }
    *taken = 1;
    if (runner->budget != Py_None && advance(runner->counter) < 0) {
        result = http_settle_pending(self, NULL, ca); /* nothing sent: Python's deliver sends */
        goto done;
    }
    PyObject *response = callargs_call(self->original, ca);
    if (response == NULL) {
        PyObject *error = fetch_error(); /* attempt: outcomes.append(error); raise */
        if (PyObject_TypeCheck(error, (PyTypeObject *)PyExc_Exception)) {
            result = http_resume(self, runner, plan, error, NULL, &started, ca);
            goto done;
        }
        /* the runner: "except BaseException: breaker.release(); raise"; then the layer */
        PyErr_Restore(Py_NewRef((PyObject *)Py_TYPE(error)), Py_NewRef(error),
                      PyException_GetTraceback(error));
        if (breaker != NULL) {
            runner_release(runner);
        }
        result = http_settle_pending(self, error, ca);
        Py_DECREF(error);
        goto done;
    }
    /* attempt: outcomes.append(response), then the status check */
    PyObject *signal = NULL;
    int failed = http_failed(self, response, statuses);
    if (failed > 0) {
        signal = PyObject_CallOneArg(self->signal, response);
        if (signal == NULL) {
            failed = -1;
        }
        else if (signal == Py_None) {
            Py_CLEAR(signal);
            failed = 0;
        }
    }
    if (signal != NULL) { /* raise signal */
        result = http_resume(self, runner, plan, signal, response, &started, ca);
    }
    else if (failed < 0) { /* raised in attempt after the response was appended */
        if (PyErr_ExceptionMatches(PyExc_Exception)) {
            result = http_resume(self, runner, plan, fetch_error(), response, &started, ca);
        }
        else {
            if (breaker != NULL) {
                runner_release(runner);
            }
            result = http_settle_pending(self, response, ca);
        }
    }
    else if (breaker != NULL && runner_record_success(runner, breaker) < 0) {
        result = http_settle_pending(self, response, ca); /* raised by the runner */
    }
    else {
        result = Py_NewRef(response);
    }
    Py_DECREF(response);
done:
    Py_XDECREF(started.value);
not_taken:
    if (!*taken) {
        PyErr_Clear();
    }
    Py_XDECREF(run);
    Py_XDECREF(statuses);
    return result;
}

static PyObject *
http_vectorcall(HttpLayerObject *self, PyObject *const *argv, size_t nargsf, PyObject *kwnames)
{
    int enabled = slot_true(&self->enabled, self->patches);
    if (enabled == 0) {
        return PyObject_Vectorcall(self->original, argv, nargsf, kwnames);
    }
    PyErr_Clear();
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (enabled < 0 || (nargs != 3 && nargs != 1) ||
        !unsuppressed(self->context_var, self->suppress_keys) ||
        http_sends_body(self, argv + nargs, kwnames)) {
        return PyObject_Vectorcall(self->slow, argv, nargsf, kwnames);
    }
    PyObject *plan = http_remembered_plan(self, argv, nargs, kwnames);
    if (plan == NULL) {
        return PyObject_Vectorcall(self->slow, argv, nargsf, kwnames);
    }
    CallArgs ca = {argv, nargs, kwnames, NULL, NULL, 0};
    int taken;
    PyObject *result = http_first_attempt(self, plan, &ca, &taken);
    callargs_release(&ca);
    Py_DECREF(plan);
    if (!taken) {
        return PyObject_Vectorcall(self->slow, argv, nargsf, kwnames);
    }
    return result;
}

static PyObject *
http_layer_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *names[] = {"slow",       "original",   "patches",          "context_var",
                            "suppress_keys", "shapes",  "plan_type",        "body_names",
                            "status_attribute", "signal", "unreadable",     "resume",
                            "settle", NULL};
    PyObject *slow, *original, *patches, *context_var, *suppress_keys, *shapes, *plan_type,
        *body_names, *status_attribute, *signal, *unreadable, *resume, *settle;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOO!O!O!O!UOOOO:HttpLayer", names, &slow,
                                     &original, &patches, &context_var, &PyTuple_Type,
                                     &suppress_keys, &PyDict_Type, &shapes, &PyType_Type,
                                     &plan_type, &PyTuple_Type, &body_names, &status_attribute,
                                     &signal, &unreadable, &resume, &settle)) {
        return NULL;
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(body_names); i++) {
        if (!PyUnicode_Check(PyTuple_GET_ITEM(body_names, i))) {
            PyErr_SetString(PyExc_TypeError, "HttpLayer body_names must be a tuple of str");
            return NULL;
        }
    }
    HttpLayerObject *self = PyObject_GC_New(HttpLayerObject, type);
    if (self == NULL) {
        return NULL;
    }
    if (layer_head_init((LayerHead *)self, slow, original, patches, context_var,
                        suppress_keys) < 0) {
        PyObject_GC_Del(self);
        return NULL;
    }
    self->shapes = Py_NewRef(shapes);
    self->plan_type = Py_NewRef(plan_type);
    self->body_names = Py_NewRef(body_names);
    self->status_attribute = Py_NewRef(status_attribute);
    self->signal = Py_NewRef(signal);
    self->unreadable = Py_NewRef(unreadable);
    self->resume = Py_NewRef(resume);
    self->settle = Py_NewRef(settle);
    slot_reader_for_type(&self->run, (PyTypeObject *)plan_type, str_run);
    slot_reader_for_type(&self->statuses, (PyTypeObject *)plan_type, str_statuses);
    self->vectorcall = (vectorcallfunc)http_vectorcall;
    PyObject_GC_Track(self);
    return (PyObject *)self;
}

static int
http_layer_traverse(HttpLayerObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->shapes);
    Py_VISIT(self->plan_type);
    Py_VISIT(self->body_names);
    Py_VISIT(self->status_attribute);
    Py_VISIT(self->signal);
    Py_VISIT(self->unreadable);
    Py_VISIT(self->resume);
    Py_VISIT(self->settle);
    return layer_head_traverse((LayerHead *)self, visit, arg);
}

static int
http_layer_clear(HttpLayerObject *self)
{
    layer_head_clear((LayerHead *)self);
    Py_CLEAR(self->shapes);
    Py_CLEAR(self->plan_type);
    Py_CLEAR(self->body_names);
    Py_CLEAR(self->status_attribute);
    Py_CLEAR(self->signal);
    Py_CLEAR(self->unreadable);
    Py_CLEAR(self->resume);
    Py_CLEAR(self->settle);
    return 0;
}

static void
http_layer_dealloc(HttpLayerObject *self)
{
    PyObject_GC_UnTrack(self);
    http_layer_clear(self);
    PyObject_GC_Del(self);
}

static PyTypeObject HttpLayerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "otel_recovery._speedups.HttpLayer",
    .tp_doc = PyDoc_STR("A request-sending patch site whose remembered first attempt is compiled."),
    .tp_basicsize = sizeof(HttpLayerObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL |
                Py_TPFLAGS_METHOD_DESCRIPTOR,
    .tp_new = http_layer_new,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(HttpLayerObject, vectorcall),
    .tp_dictoffset = offsetof(HttpLayerObject, dict),
    .tp_descr_get = layer_descr_get,
    .tp_getset = layer_getset,
    .tp_getattro = PyObject_GenericGetAttr,
    .tp_setattro = PyObject_GenericSetAttr,
    .tp_traverse = (traverseproc)http_layer_traverse,
    .tp_clear = (inquiry)http_layer_clear,
    .tp_dealloc = (destructor)http_layer_dealloc,
};

/* ------------------------------------------------------------------------------------ */

static struct PyModuleDef speedups_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "otel_recovery._speedups",
    .m_doc = "The compiled happy path of otel_recovery's runners and per-call layers.",
    .m_size = -1,
};

static int
intern(PyObject **slot, const char *text)
{
    *slot = PyUnicode_InternFromString(text);
    return *slot == NULL ? -1 : 0;
}

PyMODINIT_FUNC
PyInit__speedups(void)
{
    if (intern(&str_active, "active") < 0 || intern(&str_permit_all, "_permit_all") < 0 ||
        intern(&str_tally, "_tally") < 0 || intern(&str_bucket_end, "_bucket_end") < 0 ||
        intern(&str_can_execute, "can_execute") < 0 ||
        intern(&str_record_call, "record_call") < 0 ||
        intern(&str_record_success, "record_success") < 0 ||
        intern(&str_release, "release") < 0 || intern(&str_enabled, "enabled") < 0 ||
        intern(&str_seen, "seen") < 0 || intern(&str_run, "run") < 0 ||
        intern(&str_statuses, "statuses") < 0 || intern(&str_method, "method") < 0 ||
        intern(&str_url, "url") < 0) {
        return NULL;
    }
    PyObject *time_module = PyImport_ImportModule("time");
    if (time_module == NULL) {
        return NULL;
    }
    time_monotonic = PyObject_GetAttrString(time_module, "monotonic");
    Py_DECREF(time_module);
    if (time_monotonic == NULL) {
        return NULL;
    }
    kw_release_false = Py_BuildValue("(s)", "release");
    if (kw_release_false == NULL) {
        return NULL;
    }
    if (PyType_Ready(&RunnerType) < 0 || PyType_Ready(&PlanTableType) < 0 ||
        PyType_Ready(&LayerType) < 0 || PyType_Ready(&HttpLayerType) < 0) {
        return NULL;
    }
    PyObject *module = PyModule_Create(&speedups_module);
    if (module == NULL) {
        return NULL;
    }
    if (PyModule_AddObjectRef(module, "Runner", (PyObject *)&RunnerType) < 0 ||
        PyModule_AddObjectRef(module, "PlanTable", (PyObject *)&PlanTableType) < 0 ||
        PyModule_AddObjectRef(module, "Layer", (PyObject *)&LayerType) < 0 ||
        PyModule_AddObjectRef(module, "HttpLayer", (PyObject *)&HttpLayerType) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
