/* AsyncRun: one awaited run of an async Runner, the compiled twin of the coroutine that
 * AsyncDriver.arunner()'s "guarded" closure returns (_driver_async.py).
 *
 * Why an object of our own and not a coroutine: a Python coroutine costs its frame and
 * the interpreter's dispatch on every step; an asyncio Redis GET through the Python async
 * layer spent some 11,000 instructions of ours (benchmarks/layer_cost.py). This object is
 * what `await` drives directly (am_send), one C call per step.
 *
 * It behaves like the coroutine it replaces, as asyncio and `await` see one:
 *
 * - Nothing runs until the first send, as with `async def`: a Layer's run decides then
 *   whether the call is ours (instrumentation on, nothing suppressed, a remembered plan;
 *   layer_decide), and the switches, the clock, the breaker's gate and the budget's deposit
 *   are read then, so a run that is never awaited takes no permit and deposits nothing
 *   (and warns, as a coroutine does).
 * - It awaits the call's coroutine by sending into it; once that ends it records the
 *   success, or, for an Exception, awaits the policy's recover() coroutine instead,
 *   outside any handler of the call's error, as "guarded" does (so the errors of later
 *   attempts keep their own __context__).
 * - send(), throw() and close() go on into what it awaits, as `await` would; close() and
 *   a BaseException such as CancelledError release the breaker's permit while the call
 *   runs. collections.abc.Coroutine recognises it, so asyncio.create_task, gather and
 *   wait_for take it. A second `await` of a suspended run, a StopIteration out of its own
 *   steps and a finished run's references are handled as a coroutine handles them.
 *
 * On 3.12 and later `await` steps it through tp_iternext rather than am_send (the SEND
 * instruction keeps its fast path for CPython's own generators), so a run that returns a
 * value pays for a StopIteration there. */
#include "speedups.h"

enum {
    RUN_NEW,   /* not sent into yet */
    RUN_CALL,  /* awaiting the call: its outcome is accounted (success, recovery, release) */
    RUN_AFTER, /* awaiting recover, reject or a passed-through call: its outcome is the run's */
    RUN_DONE,
};

typedef struct {
    PyObject_VAR_HEAD
    RunnerObject *runner; /* NULL until a Layer's run has decided (layer_decide) */
    PyObject *layer;      /* the Layer that made the run, or NULL (a runner called from Python) */
    PyObject *fn;
    /* The arguments as given: a vector (from a Layer: argv points at items, kwnames is
     * ours) or a tuple and a dict (from Python). The slow paths materialize the tuple and
     * dict of a vector (callargs_materialize); either way, owned ones are released. */
    CallArgs call;
    PyObject *explain; /* the Layer's: says why a failure under `plan` was not retried */
    PyObject *plan;    /* the plan a Layer's run decided on, or NULL */
    PyObject *inner;   /* what is being awaited, or NULL */
    Started started;
    int state;
    int running;
    PyObject *items[1]; /* a vector's positional and keyword argument values, owned */
} AsyncRunObject;

static AsyncRunObject *
async_run_alloc(RunnerObject *runner, PyObject *layer, PyObject *fn, Py_ssize_t items,
                PyObject *explain)
{
    AsyncRunObject *self = PyObject_GC_NewVar(AsyncRunObject, &AsyncRunType, items);
    if (self == NULL) {
        return NULL;
    }
    self->runner = (RunnerObject *)Py_XNewRef((PyObject *)runner);
    self->layer = Py_XNewRef(layer);
    self->fn = Py_NewRef(fn);
    self->call = (CallArgs){NULL, 0, NULL, NULL, NULL, 0};
    self->explain = Py_XNewRef(explain);
    self->plan = NULL;
    self->inner = NULL;
    self->started.value = NULL;
    self->started.seconds = 0.0;
    self->state = RUN_NEW;
    self->running = 0;
    return self;
}

/* A Layer's call: the arguments stay a vector, copied (no tuple, no dict). */
PyObject *
async_run_from_layer(PyObject *layer, PyObject *fn, PyObject *const *argv, Py_ssize_t nargs,
                     PyObject *kwnames, PyObject *explain)
{
    Py_ssize_t count = nargs + (kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames));
    AsyncRunObject *self = async_run_alloc(NULL, layer, fn, count, explain);
    if (self == NULL) {
        return NULL;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        self->items[i] = Py_NewRef(argv[i]);
    }
    self->call = (CallArgs){self->items, nargs, Py_XNewRef(kwnames), NULL, NULL, 0};
    PyObject_GC_Track(self);
    return (PyObject *)self;
}

/* A runner's call from Python: run(fn, args, kwargs). */
PyObject *
async_run_from_tuple(RunnerObject *runner, PyObject *fn, PyObject *args, PyObject *kwargs)
{
    AsyncRunObject *self = async_run_alloc(runner, NULL, fn, 0, NULL);
    if (self == NULL) {
        return NULL;
    }
    self->call = (CallArgs){NULL, 0, NULL, Py_NewRef(args), Py_NewRef(kwargs), 1};
    PyObject_GC_Track(self);
    return (PyObject *)self;
}

/* fn(*args, **kwargs), as given. */
static inline PyObject *
async_run_call(AsyncRunObject *self)
{
    return callargs_call(self->fn, &self->call);
}

/* Await `pending` (stolen) next, in `state`: a coroutine as it is, anything else through
 * the runner's resolve (which awaits an awaitable and passes a plain value through, as the
 * Python closure does). -1 with an error set. */
static int
async_run_adopt(AsyncRunObject *self, PyObject *pending, int state)
{
    if (UNLIKELY(!PyCoro_CheckExact(pending))) {
        PyObject *resolved = PyObject_CallOneArg(self->runner->resolve, pending);
        Py_DECREF(pending);
        if (resolved == NULL) {
            return -1;
        }
        pending = resolved;
    }
    self->inner = pending;
    self->state = state;
    return 0;
}

/* A native coroutine, or a generator made one by types.coroutine: what `await` drives as
 * it is. */
static int
is_coroutine(PyObject *candidate)
{
    if (PyCoro_CheckExact(candidate)) {
        return 1;
    }
    if (!PyGen_CheckExact(candidate)) {
        return 0;
    }
    PyObject *code = PyObject_GetAttrString(candidate, "gi_code");
    int iterable = code != NULL && PyCode_Check(code) &&
                   (((PyCodeObject *)code)->co_flags & CO_ITERABLE_COROUTINE);
    Py_XDECREF(code);
    PyErr_Clear();
    return iterable;
}

/* What `await awaitable` iterates, checked as CPython checks it (_PyCoro_GetAwaitableIter);
 * NULL with a TypeError when it cannot be awaited. */
static PyObject *
await_iterator(PyObject *awaitable)
{
    PyAsyncMethods *as_async = Py_TYPE(awaitable)->tp_as_async;
    if (as_async == NULL || as_async->am_await == NULL) {
        PyErr_Format(PyExc_TypeError, "object %.100s can't be used in 'await' expression",
                     Py_TYPE(awaitable)->tp_name);
        return NULL;
    }
    PyObject *iterator = as_async->am_await(awaitable);
    if (iterator == NULL) {
        return NULL;
    }
    if (is_coroutine(iterator)) {
        PyErr_SetString(PyExc_TypeError, "__await__() returned a coroutine");
        Py_DECREF(iterator);
        return NULL;
    }
    if (!PyIter_Check(iterator)) {
        PyErr_Format(PyExc_TypeError, "__await__() returned non-iterator of type '%.100s'",
                     Py_TYPE(iterator)->tp_name);
        Py_DECREF(iterator);
        return NULL;
    }
    return iterator;
}

/* Await `pending` (stolen) in place of the run, as `await pending` would: what a Layer's run
 * decided was not its to run (layer_decide). -1 with an error set. */
COLD static int
async_run_pass(AsyncRunObject *self, PyObject *pending)
{
    if (!is_coroutine(pending)) {
        PyObject *iterator = await_iterator(pending);
        Py_DECREF(pending);
        if (iterator == NULL) {
            return -1;
        }
        pending = iterator;
    }
    self->inner = pending;
    self->state = RUN_AFTER;
    return 0;
}

/* The call failed (the error is set): for an Exception, await recover(fn, args, kwargs,
 * error, started, took) next, outside any handler of the error (as "guarded" does); for
 * anything else release the breaker's permit and let it propagate (-1). */
COLD static int
async_run_failed(AsyncRunObject *self)
{
    RunnerObject *runner = self->runner;
    if (!PyErr_ExceptionMatches(PyExc_Exception)) {
        if (runner->breaker != Py_None) {
            runner_release(runner);
        }
        return -1;
    }
    PyObject *value = fetch_error();
    int status = -1;
    PyObject *start = started_object(&self->started);
    PyObject *ended = start == NULL ? NULL : PyObject_CallNoArgs(runner->now);
    PyObject *took = ended == NULL ? NULL : PyNumber_Subtract(ended, start);
    Py_XDECREF(ended);
    if (took != NULL && callargs_materialize(&self->call) == 0) {
        CallArgs *ca = &self->call;
        PyObject *call_args[6] = {self->fn, ca->args, ca->kwargs, value, start, took};
        PyObject *pending = PyObject_Vectorcall(runner->recover, call_args, 6, NULL);
        status = pending == NULL ? -1 : async_run_adopt(self, pending, RUN_AFTER);
    }
    Py_XDECREF(took);
    Py_DECREF(value);
    return status;
}

/* The first send: RecoveryPolicy's happy path up to the call, as runner_run does it; then
 * await what the call returned. -1 with an error set. */
static int
async_run_start(AsyncRunObject *self)
{
    if (self->layer != NULL) {
        PyObject *instead;
        PyObject *plan = layer_decide(self->layer, self->call.argv, self->call.nargs,
                                      self->call.kwnames, &instead);
        if (UNLIKELY(plan == NULL)) {
            return instead == NULL ? -1 : async_run_pass(self, instead);
        }
        self->plan = plan;
        self->runner = (RunnerObject *)Py_NewRef(PyTuple_GET_ITEM(plan, 3));
    }
    RunnerObject *runner = self->runner;
    int active = slot_true(&runner->active, runner->switches);
    if (UNLIKELY(active <= 0)) {
        PyObject *pending = active < 0 ? NULL : async_run_call(self);
        return pending == NULL ? -1 : async_run_adopt(self, pending, RUN_AFTER);
    }
    if (UNLIKELY(started_read(runner, &self->started) < 0)) {
        return -1;
    }
    PyObject *breaker = runner->breaker == Py_None ? NULL : runner->breaker;
    if (breaker != NULL) {
        int permitted = runner->gate_unlocked ? slot_true(&runner->permit_all, breaker) : 0;
        if (UNLIKELY(permitted != 1)) {
            permitted = permitted < 0 ? -1 : runner_gate(breaker);
            if (permitted <= 0) {
                PyObject *pending =
                    permitted < 0 ? NULL
                                  : runner_reject(runner, self->fn, &self->call, &self->started);
                return pending == NULL ? -1 : async_run_adopt(self, pending, RUN_AFTER);
            }
        }
    }
    if (runner->budget != Py_None) {
        int before =
            runner->counter == Py_None ? 0 : runner_before_bucket_end(runner, &self->started);
        if (LIKELY(before == 1)) {
            if (UNLIKELY(advance(runner->counter) < 0)) {
                return -1;
            }
        }
        else if (before < 0 || runner_record_call(runner, &self->started) < 0) {
            return -1;
        }
    }
    PyObject *pending = async_run_call(self);
    if (UNLIKELY(pending == NULL || async_run_adopt(self, pending, RUN_CALL) < 0)) {
        return async_run_failed(self);
    }
    return 0;
}

/* The call returned `result`: account the success as runner_run does. -1 on error. */
static int
async_run_succeeded(AsyncRunObject *self, PyObject *result)
{
    RunnerObject *runner = self->runner;
    if (runner->breaker != Py_None && UNLIKELY(runner_record_success(runner, runner->breaker) < 0)) {
        return -1;
    }
    if (UNLIKELY(runner->remember != Py_None)) {
        return runner_remember(runner, self->fn, &self->call, result, &self->started);
    }
    return 0;
}

/* The run is over: like a finished coroutine's frame, it lets go of the call's arguments,
 * its plan and what it awaited (fn stays: a Task's repr names it). */
static void
async_run_end(AsyncRunObject *self)
{
    self->state = RUN_DONE;
    self->running = 0;
    Py_CLEAR(self->inner);
    for (Py_ssize_t i = 0; i < Py_SIZE(self); i++) {
        Py_CLEAR(self->items[i]);
    }
    Py_CLEAR(self->call.kwnames);
    callargs_release(&self->call);
    self->call.argv = NULL;
    Py_CLEAR(self->plan);
    Py_CLEAR(self->explain);
    Py_CLEAR(self->layer);
}

/* Raise what throw(type[, value[, traceback]]) was given, as a coroutine's throw does: 0.
 * -1 with a TypeError set when the arguments are no exception to throw. */
COLD static int
raise_thrown(PyObject *thrown)
{
    Py_ssize_t count = PyTuple_GET_SIZE(thrown);
    PyObject *type = PyTuple_GET_ITEM(thrown, 0);
    PyObject *value = count > 1 ? PyTuple_GET_ITEM(thrown, 1) : Py_None;
    PyObject *traceback = count > 2 ? PyTuple_GET_ITEM(thrown, 2) : Py_None;
    if (traceback == Py_None) {
        traceback = NULL;
    }
    else if (!PyTraceBack_Check(traceback)) {
        PyErr_SetString(PyExc_TypeError, "throw() third argument must be a traceback object");
        return -1;
    }
    if (PyExceptionClass_Check(type)) {
        PyObject *t = Py_NewRef(type), *v = Py_NewRef(value), *tb = Py_XNewRef(traceback);
        PyErr_NormalizeException(&t, &v, &tb);
        if (v != NULL && tb != NULL) {
            PyException_SetTraceback(v, tb);
        }
        PyErr_Restore(t, v, tb);
        return 0;
    }
    if (PyExceptionInstance_Check(type)) {
        if (value != Py_None) {
            PyErr_SetString(PyExc_TypeError, "instance exception may not have a separate value");
            return -1;
        }
        PyObject *tb = traceback != NULL ? Py_NewRef(traceback) : PyException_GetTraceback(type);
        PyErr_Restore(Py_NewRef((PyObject *)Py_TYPE(type)), Py_NewRef(type), tb);
        return 0;
    }
    PyErr_Format(PyExc_TypeError,
                 "exceptions must be classes or instances deriving from BaseException, "
                 "not %.200s",
                 Py_TYPE(type)->tp_name);
    return -1;
}

/* throw() was given GeneratorExit (a class or an instance): a coroutine closes what it
 * awaits then, instead of throwing it in. */
static int
is_generator_exit(PyObject *thrown)
{
    PyObject *type = PyTuple_GET_ITEM(thrown, 0);
    if (PyExceptionInstance_Check(type)) {
        type = (PyObject *)Py_TYPE(type);
    }
    return PyExceptionClass_Check(type) &&
           PyObject_IsSubclass(type, PyExc_GeneratorExit) == 1;
}

/* inner.close(), if it has one; -1 with an error set. */
static int
close_inner(PyObject *inner)
{
    PyObject *method = PyObject_GetAttrString(inner, "close");
    if (method == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_AttributeError)) {
            return -1;
        }
        PyErr_Clear();
        return 0;
    }
    PyObject *result = PyObject_CallNoArgs(method);
    Py_DECREF(method);
    if (result == NULL) {
        return -1;
    }
    Py_DECREF(result);
    return 0;
}

/* A StopIteration out of the run's own steps (a clock, a callback) would end the await
 * that drives it as if the run had returned: converted as a coroutine converts it. */
COLD static void
convert_stop_iteration(void)
{
    PyObject *stop = fetch_error();
    PyErr_SetString(PyExc_RuntimeError, "coroutine raised StopIteration");
    PyObject *error = fetch_error();
    PyException_SetCause(error, Py_NewRef(stop));
    PyException_SetContext(error, stop); /* steals stop */
    PyErr_Restore(Py_NewRef((PyObject *)Py_TYPE(error)), error, PyException_GetTraceback(error));
}

/* inner.throw(*thrown), as `await` passes a throw on to what it awaits. */
COLD static PySendResult
throw_into(PyObject *inner, PyObject *thrown, PyObject **presult)
{
    PyObject *method = PyObject_GetAttrString(inner, "throw");
    if (method == NULL) {
        if (PyErr_ExceptionMatches(PyExc_AttributeError)) {
            PyErr_Clear();
            raise_thrown(thrown); /* nothing to pass it on to: it is raised here */
        }
        return PYGEN_ERROR;
    }
    *presult = PyObject_Call(method, thrown, NULL);
    Py_DECREF(method);
    if (*presult != NULL) {
        return PYGEN_NEXT;
    }
    if (!PyErr_ExceptionMatches(PyExc_StopIteration)) {
        return PYGEN_ERROR;
    }
    PyObject *stop = fetch_error();
    *presult = Py_NewRef(((PyStopIterationObject *)stop)->value);
    Py_DECREF(stop);
    return PYGEN_RETURN;
}

/* Send `value` into the run (or throw `thrown`, throw()'s arguments) and carry on until
 * what it awaits yields, or the run ends. */
static PySendResult
async_run_step(AsyncRunObject *self, PyObject *value, PyObject *thrown, PyObject **presult)
{
    *presult = NULL;
    if (UNLIKELY(self->running)) {
        PyErr_SetString(PyExc_ValueError, "coroutine already executing");
        return PYGEN_ERROR;
    }
    if (UNLIKELY(self->state == RUN_DONE)) {
        PyErr_SetString(PyExc_RuntimeError, "cannot reuse already awaited coroutine");
        return PYGEN_ERROR;
    }
    if (self->state == RUN_NEW) {
        if (UNLIKELY(thrown != NULL)) { /* raised where the coroutine would start */
            if (raise_thrown(thrown) == 0) {
                async_run_end(self);
            }
            return PYGEN_ERROR; /* arguments it refused leave it as it was */
        }
        if (UNLIKELY(value != Py_None)) {
            PyErr_SetString(PyExc_TypeError,
                            "can't send non-None value to a just-started coroutine");
            return PYGEN_ERROR;
        }
        self->running = 1;
        if (UNLIKELY(async_run_start(self) < 0)) {
            goto failed;
        }
    }
    self->running = 1;
    for (;;) {
        PyObject *out = NULL;
        PySendResult status;
        if (UNLIKELY(thrown != NULL && is_generator_exit(thrown))) {
            /* as a coroutine: close what it awaits, then GeneratorExit is raised here */
            status = PYGEN_ERROR;
            if (close_inner(self->inner) == 0) {
                raise_thrown(thrown);
            }
        }
        else {
            status = LIKELY(thrown == NULL) ? PyIter_Send(self->inner, value, &out)
                                            : throw_into(self->inner, thrown, &out);
        }
        if (status == PYGEN_NEXT) {
            self->running = 0;
            *presult = out;
            return PYGEN_NEXT;
        }
        thrown = NULL;
        value = Py_None;
        Py_CLEAR(self->inner);
        if (status == PYGEN_RETURN) {
            if (self->state == RUN_CALL && UNLIKELY(async_run_succeeded(self, out) < 0)) {
                Py_DECREF(out);
                goto failed;
            }
            async_run_end(self);
            *presult = out;
            return PYGEN_RETURN;
        }
        if (self->state != RUN_CALL || async_run_failed(self) < 0) {
            goto failed;
        }
        /* recovering: await recover's coroutine from its start */
    }
failed:
    if (UNLIKELY(PyErr_ExceptionMatches(PyExc_StopIteration))) {
        convert_stop_iteration();
    }
    if (self->plan != NULL && PyErr_ExceptionMatches(PyExc_Exception)) {
        explain_error(self->explain, self->plan); /* what the Layer's except clause does */
    }
    async_run_end(self);
    return PYGEN_ERROR;
}

static PySendResult
async_run_am_send(AsyncRunObject *self, PyObject *value, PyObject **presult)
{
    return async_run_step(self, value, NULL, presult);
}

/* A step's outcome as a method returns it: the yielded value, or NULL with StopIteration
 * carrying the run's result (or the run's error). */
static PyObject *
as_method_result(PySendResult status, PyObject *out)
{
    if (status == PYGEN_NEXT) {
        return out;
    }
    if (status == PYGEN_RETURN) {
        if (out == Py_None) {
            PyErr_SetNone(PyExc_StopIteration);
        }
        else if (!PyTuple_Check(out) && !PyExceptionInstance_Check(out)) {
            PyErr_SetObject(PyExc_StopIteration, out); /* made into StopIteration(out) lazily */
        }
        else { /* a tuple or an exception is the one value, not the arguments */
            PyObject *stop = PyObject_CallOneArg(PyExc_StopIteration, out);
            if (stop != NULL) {
                PyErr_SetObject(PyExc_StopIteration, stop);
                Py_DECREF(stop);
            }
        }
        Py_DECREF(out);
    }
    return NULL;
}

static PyObject *
async_run_iternext(AsyncRunObject *self)
{
    PyObject *out;
    PySendResult status = async_run_step(self, Py_None, NULL, &out);
    if (status == PYGEN_RETURN && out == Py_None) {
        Py_DECREF(out);
        return NULL; /* StopIteration, said by returning NULL without an error */
    }
    return as_method_result(status, out);
}

/* `await run`: the run itself, unless another await is already driving it. */
static PyObject *
async_run_await(AsyncRunObject *self)
{
    if (UNLIKELY(self->inner != NULL && !self->running)) {
        PyErr_SetString(PyExc_RuntimeError, "coroutine is being awaited already");
        return NULL;
    }
    return Py_NewRef((PyObject *)self);
}

static PyObject *
async_run_send(AsyncRunObject *self, PyObject *value)
{
    PyObject *out;
    PySendResult status = async_run_step(self, value, NULL, &out);
    return as_method_result(status, out);
}

static PyObject *
async_run_throw(AsyncRunObject *self, PyObject *args)
{
    Py_ssize_t count = PyTuple_GET_SIZE(args);
    if (count < 1 || count > 3) {
        PyErr_Format(PyExc_TypeError, "throw expected 1 to 3 arguments, got %zd", count);
        return NULL;
    }
    /* passed on without trailing Nones: 3.12 deprecates throw()'s three-argument form */
    while (count > 1 && PyTuple_GET_ITEM(args, count - 1) == Py_None) {
        count--;
    }
    PyObject *thrown = PyTuple_GetSlice(args, 0, count);
    if (thrown == NULL) {
        return NULL;
    }
    PyObject *out;
    PySendResult status = async_run_step(self, Py_None, thrown, &out);
    Py_DECREF(thrown);
    return as_method_result(status, out);
}

/* close(): what it awaits is closed; while that is the call, the breaker's permit is
 * released, as GeneratorExit at `await` reaches "except BaseException: release()". */
static PyObject *
async_run_close(AsyncRunObject *self, PyObject *unused)
{
    if (self->running) {
        PyErr_SetString(PyExc_ValueError, "coroutine already executing");
        return NULL;
    }
    int state = self->state;
    PyObject *inner = self->inner;
    int status = 0;
    if (inner != NULL) {
        self->running = 1;
        self->inner = NULL;
        status = close_inner(inner); /* as gen_close: the call's error is not pushed */
        Py_DECREF(inner);
    }
    async_run_end(self);
    if (state == RUN_CALL && self->runner != NULL && self->runner->breaker != Py_None) {
        if (status < 0) {
            runner_release(self->runner); /* keeps the error, chaining release's to it */
        }
        else {
            status = call_method_discard(self->runner->breaker, str_release);
        }
    }
    if (status < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

/* As a coroutine's finalizer: one never awaited warns; one left suspended is closed. */
static void
async_run_finalize(AsyncRunObject *self)
{
    if (self->state == RUN_DONE) {
        return;
    }
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    if (self->state == RUN_NEW) {
        self->state = RUN_DONE;
        PyObject *name = PyObject_GetAttrString(self->fn, "__qualname__");
        if (name == NULL || !PyUnicode_Check(name)) {
            PyErr_Clear();
            Py_XSETREF(name, PyObject_Repr(self->fn));
        }
        if (name == NULL ||
            PyErr_WarnFormat(PyExc_RuntimeWarning, 1, "coroutine '%U' was never awaited",
                             name) < 0) {
            PyErr_WriteUnraisable((PyObject *)self);
        }
        Py_XDECREF(name);
    }
    else {
        PyObject *closed = async_run_close(self, NULL);
        if (closed == NULL) {
            PyErr_WriteUnraisable((PyObject *)self);
        }
        Py_XDECREF(closed);
    }
    PyErr_Restore(type, value, traceback);
}

static int
async_run_traverse(AsyncRunObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->runner);
    Py_VISIT(self->layer);
    Py_VISIT(self->fn);
    for (Py_ssize_t i = 0; i < Py_SIZE(self); i++) {
        Py_VISIT(self->items[i]);
    }
    Py_VISIT(self->call.kwnames);
    Py_VISIT(self->call.args);
    Py_VISIT(self->call.kwargs);
    Py_VISIT(self->explain);
    Py_VISIT(self->plan);
    Py_VISIT(self->inner);
    Py_VISIT(self->started.value);
    return 0;
}

static int
async_run_clear(AsyncRunObject *self)
{
    Py_CLEAR(self->runner);
    Py_CLEAR(self->layer);
    Py_CLEAR(self->fn);
    for (Py_ssize_t i = 0; i < Py_SIZE(self); i++) {
        Py_CLEAR(self->items[i]);
    }
    Py_CLEAR(self->call.kwnames);
    callargs_release(&self->call);
    Py_CLEAR(self->explain);
    Py_CLEAR(self->plan);
    Py_CLEAR(self->inner);
    Py_CLEAR(self->started.value);
    return 0;
}

static void
async_run_dealloc(AsyncRunObject *self)
{
    if (PyObject_CallFinalizerFromDealloc((PyObject *)self) < 0) {
        return; /* resurrected by its finalizer */
    }
    PyObject_GC_UnTrack(self);
    async_run_clear(self);
    PyObject_GC_Del(self);
}

static PyObject *
async_run_get_running(AsyncRunObject *self, void *closure)
{
    return PyBool_FromLong(self->running);
}

static PyObject *
async_run_get_await(AsyncRunObject *self, void *closure)
{
    return Py_NewRef(self->inner != NULL ? self->inner : Py_None);
}

static PyObject *
async_run_get_name(AsyncRunObject *self, void *closure)
{
    return PyObject_GetAttrString(self->fn, closure == NULL ? "__name__" : "__qualname__");
}

static PyMethodDef async_run_methods[] = {
    {"send", (PyCFunction)async_run_send, METH_O,
     PyDoc_STR("send(value): as a coroutine's send; StopIteration carries the result.")},
    {"throw", (PyCFunction)async_run_throw, METH_VARARGS,
     PyDoc_STR("throw(exception): as a coroutine's throw, passed on to what it awaits.")},
    {"close", (PyCFunction)async_run_close, METH_NOARGS,
     PyDoc_STR("close(): closes what it awaits; releases the breaker's permit mid-call.")},
    {NULL},
};

static PyGetSetDef async_run_getset[] = {
    {"cr_running", (getter)async_run_get_running, NULL, "a step is running", NULL},
    {"cr_await", (getter)async_run_get_await, NULL, "what the run awaits, or None", NULL},
    {"__name__", (getter)async_run_get_name, NULL, "the called function's", NULL},
    {"__qualname__", (getter)async_run_get_name, NULL, "the called function's", "qualname"},
    {NULL},
};

static PyAsyncMethods async_run_as_async = {
    .am_await = (unaryfunc)async_run_await,
    .am_send = (sendfunc)async_run_am_send,
};

PyTypeObject AsyncRunType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "otel_recovery._speedups.AsyncRun",
    .tp_doc = PyDoc_STR("One awaited run of an async Runner: a coroutine, compiled."),
    .tp_basicsize = offsetof(AsyncRunObject, items),
    .tp_itemsize = sizeof(PyObject *),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_as_async = &async_run_as_async,
    .tp_iternext = (iternextfunc)async_run_iternext,
    .tp_methods = async_run_methods,
    .tp_getset = async_run_getset,
    .tp_traverse = (traverseproc)async_run_traverse,
    .tp_clear = (inquiry)async_run_clear,
    .tp_finalize = (destructor)async_run_finalize,
    .tp_dealloc = (destructor)async_run_dealloc,
};
