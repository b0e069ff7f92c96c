/*-------------------------------------------------------------------------
 *
 * rowsource.c
 *		  Rows from the FDW class's execute(), for both scan nodes: the
 *		  foreign scan (scan.c) and the batched nested loop
 *		  (batchjoin_exec.c).
 *
 * A row crosses in two steps: with the GIL held, the Python row becomes
 * strings in the server encoding (llmfdw_rowsource_convert); without it, the
 * columns' input functions turn them into the slot (llmfdw_rowsource_store),
 * so a Postgres ERROR there never unwinds through Python.
 *
 *-------------------------------------------------------------------------
 */
#include "llmfdw.h"

#include "pgstat.h"
#include "utils/memutils.h"
#include "utils/wait_event.h"

/* ---------------------------------------------------------------------
 * Python reference clean-up tied to memory contexts
 *
 * An aborted query never reaches EndForeignScan (Multicorn leaks its
 * generator then, #140); a callback on the query's memory context always
 * runs, so the generator is closed and its gRPC call cancelled.
 *
 * The row source holds the quals execute() was given.  When the scan ends
 * normally they are dropped with the generator; when it is aborted (a
 * cancel), closing the generator on the backend's thread still runs its
 * finally blocks, but the quals, which hold the values of `input =
 * ANY(<200,000 texts>)`, are handed to llmfdw_free_later: freeing them took
 * milliseconds of the backend's time that the cancelled client waited for.
 * --------------------------------------------------------------------- */

/* Close the generators among objs and drop every reference; takes the GIL. */
void
llmfdw_release_python(PyObject **objs, int n)
{
	LlmfdwPyState st;
	bool		any = false;

	for (int i = 0; i < n; i++)
		any |= (objs[i] != NULL);
	if (!any)
		return;
	llmfdw_enter(&st);
	for (int i = 0; i < n; i++)
	{
		if (objs[i] != NULL && PyGen_Check(objs[i]))
		{
			PyObject   *r = PyObject_CallMethod(objs[i], "close", NULL);

			Py_XDECREF(r);
			PyErr_Clear();
		}
		Py_CLEAR(objs[i]);
	}
	llmfdw_leave(&st);
}

/*
 * Set quals (a new reference, which this steals) aside for
 * llmfdw_free_later.  A list-valued Qual's list goes in an entry of its own,
 * before the quals: the freeing thread takes the quals first, so the list is
 * then its alone and is freed in steps that let the GIL go.  The quals and
 * their values are objects the host made (Qual, lists, str, numbers): no
 * finalizer of theirs needs the backend's thread (one that an execute()
 * hung on them runs in the freeing thread, where the host refuses calls).
 */
static void
free_quals_later(PyObject *quals)
{
	if (PyList_CheckExact(quals))
	{
		for (Py_ssize_t i = 0; i < PyList_GET_SIZE(quals); i++)
		{
			PyObject   *value = PyObject_GetAttrString(PyList_GET_ITEM(quals, i),
													   "value");

			if (value != NULL && PyList_CheckExact(value))
				llmfdw_free_later(value);
			else
				Py_XDECREF(value);
			PyErr_Clear();
		}
	}
	llmfdw_free_later(quals);
}

/* The query's memory context goes (an abort, or the end of a query). */
static void
rowsource_cleanup(void *arg)
{
	LlmfdwRowSource *src = arg;
	LlmfdwPyState st;
	PyObject   *quals = src->quals;

	src->quals = NULL;
	llmfdw_rowsource_release(src);
	if (quals == NULL)
		return;
	llmfdw_enter(&st);
	free_quals_later(quals);
	llmfdw_leave(&st);
}

/*
 * Set up a row source for a foreign table whose columns desc describes; the
 * caller fills src->needed.  Its Python objects live until query_cxt is
 * reset, or llmfdw_rowsource_release.
 */
void
llmfdw_rowsource_init(LlmfdwRowSource *src, Oid foreigntableid, TupleDesc desc,
					  MemoryContext query_cxt)
{
	src->natts = desc->natts;
	src->columns = llmfdw_columns(desc);
	src->row.values = palloc0(sizeof(char *) * src->natts);
	src->row.lengths = palloc0(sizeof(int) * src->natts);
	src->row.nulls = palloc0(sizeof(bool) * src->natts);
	src->row.binary = palloc0(sizeof(bool) * src->natts);
	src->iterator = NULL;
	src->quals = NULL;
	src->instance = llmfdw_get_instance(foreigntableid);
	src->cleanup.func = rowsource_cleanup;
	src->cleanup.arg = src;
	MemoryContextRegisterResetCallback(query_cxt, &src->cleanup);
}

/*
 * Call execute(quals, columns, **kwargs) (kwargs may be NULL) and keep the
 * iterator it returns.  False when it returns None: no rows.  GIL held
 * through st; a Python error becomes a Postgres ERROR.  Consumes quals (the
 * row source keeps them until the next stop or release) and kwargs, so that
 * no reference is left behind when the ERROR unwinds.
 */
bool
llmfdw_rowsource_start(LlmfdwRowSource *src, LlmfdwPyState *st, PyObject *quals,
					   PyObject *kwargs)
{
	PyObject   *cols = llmfdw_column_names(src->needed, src->columns);
	PyObject   *args = cols ? PyTuple_Pack(2, quals, cols) : NULL;
	PyObject   *meth = args ? PyObject_GetAttrString(src->instance, "execute") : NULL;
	PyObject   *result = meth ? PyObject_Call(meth, args, kwargs) : NULL;

	Py_XSETREF(src->quals, quals);
	Py_XDECREF(kwargs);
	Py_XDECREF(cols);
	Py_XDECREF(args);
	Py_XDECREF(meth);
	if (result == NULL)
		llmfdw_raise_python_error(st, "calling execute()");
	if (result == Py_None)
	{
		Py_DECREF(result);
		return false;
	}
	src->iterator = PyObject_GetIter(result);
	Py_DECREF(result);
	if (src->iterator == NULL)
		llmfdw_raise_python_error(st, "execute() must return an iterable");
	return true;
}

/*
 * The next row of the running execute() (a new reference), or NULL once it
 * is done, when the iterator is dropped.  The wait is reported as wait event
 * "LlmfdwSidecar" (named on 17+; PG_WAIT_EXTENSION before): a scan spends
 * that time waiting for the sidecar, and pg_stat_activity should say so.
 * GIL held through st.
 */
PyObject *
llmfdw_rowsource_fetch(LlmfdwRowSource *src, LlmfdwPyState *st)
{
#if PG_VERSION_NUM >= 170000
	static uint32 event = 0;
#else
	const uint32 event = PG_WAIT_EXTENSION;
#endif
	PyObject   *item;

#if PG_VERSION_NUM >= 170000
	if (event == 0)
		event = WaitEventExtensionNew("LlmfdwSidecar");
#endif
	pgstat_report_wait_start(event);
	item = PyIter_Next(src->iterator);
	pgstat_report_wait_end();
	if (item == NULL)
	{
		if (PyErr_Occurred())
			llmfdw_raise_python_error(st, "iterating over the result of execute()");
		Py_CLEAR(src->iterator);
	}
	return item;
}

/*
 * Step 1 of a row (GIL held through st): item, which this consumes, becomes
 * src->row, allocated in the current memory context.
 */
void
llmfdw_rowsource_convert(LlmfdwRowSource *src, LlmfdwPyState *st, PyObject *item)
{
	bool		ok = llmfdw_row_to_strings(item, src->columns, src->natts,
										   src->needed, &src->row);

	Py_DECREF(item);
	if (!ok)
		llmfdw_raise_python_error(st, "converting a row returned by execute()");
}

/* Step 2 (GIL not held): src->row into slot, through the columns' input functions. */
void
llmfdw_rowsource_store(LlmfdwRowSource *src, TupleTableSlot *slot)
{
	llmfdw_strings_to_slot(slot, src->columns, &src->row);
}

/*
 * Drop the running execute(), if any: closing its generator cancels its
 * calls.  Its quals go after it, when nothing of it can use them any more.
 */
void
llmfdw_rowsource_stop(LlmfdwRowSource *src)
{
	PyObject   *objs[2] = {src->iterator, src->quals};

	src->iterator = NULL;
	src->quals = NULL;
	llmfdw_release_python(objs, 2);
}

/* Drop every Python object of the row source (the end of the scan). */
void
llmfdw_rowsource_release(LlmfdwRowSource *src)
{
	PyObject   *objs[3] = {src->iterator, src->quals, src->instance};

	src->iterator = NULL;
	src->quals = NULL;
	src->instance = NULL;
	llmfdw_release_python(objs, 3);
}
