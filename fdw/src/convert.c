/*-------------------------------------------------------------------------
 *
 * convert.c
 *		  Values between Postgres and Python.
 *
 * Postgres -> Python (qual values): text types -> str, integers -> int,
 * floats and numeric -> float, bool -> bool, bytea -> bytes, arrays -> list,
 * date -> datetime.date, timestamp -> datetime.datetime (microseconds kept),
 * NULL -> None, anything else -> its text output as str.  (Multicorn gives
 * bool, int2, int8 and float as strings and drops microseconds; we give real
 * types.)
 *
 * Python -> Postgres (result rows), in two steps so that nothing can throw a
 * Postgres ERROR while the GIL is held:
 *	1. with the GIL: each value becomes a C string in the column type's text
 *	   input format, as Multicorn2 makes it: sequences become '{...}' for
 *	   array columns and Python's str() of the list otherwise ("[1.5, 2.0]",
 *	   which is also pgvector's format); dicts become hstore's '"k"=>"v"';
 *	   dates and datetimes their ISO format.  Unlike Multicorn2, dicts and
 *	   lists become JSON for json/jsonb columns, nested lists always become
 *	   multidimensional arrays (Multicorn2 follows attndims, which Postgres
 *	   does not enforce), a tuple is formatted as a list and None in a dict
 *	   is NULL; bytes go to bytea columns as they are);
 *	2. without the GIL: the type's input function parses it, so a vector(384)
 *	   column rejects a 385-element list with pgvector's own error.
 * A bytes value for a column that is not bytea is taken as the type's binary
 * (COPY BINARY / send) format and parsed by its receive function: an FDW can
 * hand over a 384-float vector without formatting 384 numbers as text.
 *
 *-------------------------------------------------------------------------
 */
#include "llmfdw.h"

#include "catalog/pg_type.h"
#include "executor/tuptable.h"
#include "lib/stringinfo.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/date.h"
#include "utils/datetime.h"
#include "utils/fmgroids.h"
#include "utils/lsyscache.h"
#include "utils/timestamp.h"

/* Python's datetime.h has the same include guard as utils/datetime.h. */
#undef DATETIME_H
#include <datetime.h>

/* ---------------------------------------------------------------------
 * Postgres -> Python
 * --------------------------------------------------------------------- */

PyObject *
llmfdw_datum_to_python(Datum value, bool isnull, Oid typid)
{
	Oid			base;
	Oid			elemtype;

	if (isnull)
		Py_RETURN_NONE;

	base = getBaseType(typid);
	switch (base)
	{
		case TEXTOID:
		case VARCHAROID:
			{
				text	   *t = DatumGetTextPP(value);

				return llmfdw_text_to_python(VARDATA_ANY(t), VARSIZE_ANY_EXHDR(t));
			}
		case BPCHAROID:
			{
				text	   *t = DatumGetTextPP(value);
				Size		len = VARSIZE_ANY_EXHDR(t);
				const char *s = VARDATA_ANY(t);

				while (len > 0 && s[len - 1] == ' ')
					len--;
				return llmfdw_text_to_python(s, len);
			}
		case NAMEOID:
			return llmfdw_text_to_python(NameStr(*DatumGetName(value)), -1);
		case INT2OID:
			return PyLong_FromLong(DatumGetInt16(value));
		case INT4OID:
			return PyLong_FromLong(DatumGetInt32(value));
		case INT8OID:
			return PyLong_FromLongLong(DatumGetInt64(value));
		case FLOAT4OID:
			return PyFloat_FromDouble(DatumGetFloat4(value));
		case FLOAT8OID:
			return PyFloat_FromDouble(DatumGetFloat8(value));
		case BOOLOID:
			return PyBool_FromLong(DatumGetBool(value));
		case BYTEAOID:
			{
				bytea	   *b = DatumGetByteaPP(value);

				return PyBytes_FromStringAndSize(VARDATA_ANY(b), VARSIZE_ANY_EXHDR(b));
			}
		case DATEOID:
			{
				DateADT		d = DatumGetDateADT(value);
				int			y,
							m,
							day;

				if (DATE_NOT_FINITE(d))
					break;
				j2date(d + POSTGRES_EPOCH_JDATE, &y, &m, &day);
				if (y < 1 || y > 9999)
					break;		/* outside Python's range: text, below */
				if (PyDateTimeAPI == NULL)
				{
					PyDateTime_IMPORT;
					if (PyDateTimeAPI == NULL)
						return NULL;
				}
				return PyDate_FromDate(y, m, day);
			}
		case TIMESTAMPOID:
			{
				Timestamp	ts = DatumGetTimestamp(value);
				struct pg_tm tm;
				fsec_t		fsec;

				if (TIMESTAMP_NOT_FINITE(ts) ||
					timestamp2tm(ts, NULL, &tm, &fsec, NULL, NULL) != 0 ||
					tm.tm_year < 1 || tm.tm_year > 9999)
					break;
				if (PyDateTimeAPI == NULL)
				{
					PyDateTime_IMPORT;
					if (PyDateTimeAPI == NULL)
						return NULL;
				}
				return PyDateTime_FromDateAndTime(tm.tm_year, tm.tm_mon, tm.tm_mday,
												  tm.tm_hour, tm.tm_min, tm.tm_sec, fsec);
			}
		case NUMERICOID:
			{
				char	   *s = OidOutputFunctionCall(F_NUMERIC_OUT, value);

				/* numeric_out writes ASCII only: no encoding to convert */
				PyObject   *str = PyUnicode_FromString(s);
				PyObject   *f = str ? PyFloat_FromString(str) : NULL;

				Py_XDECREF(str);
				return f;
			}
		default:
			break;
	}

	elemtype = get_element_type(base);
	if (OidIsValid(elemtype))
	{
		ArrayType  *arr = DatumGetArrayTypeP(value);
		int16		elmlen;
		bool		elmbyval;
		char		elmalign;
		Datum	   *elems;
		bool	   *nulls;
		int			n;
		PyObject   *list;

		get_typlenbyvalalign(elemtype, &elmlen, &elmbyval, &elmalign);
		deconstruct_array(arr, elemtype, elmlen, elmbyval, elmalign,
						  &elems, &nulls, &n);
		list = PyList_New(n);
		if (list == NULL)
			return NULL;
		for (int i = 0; i < n; i++)
		{
			PyObject   *item;

			/* 200,000 texts take tens of milliseconds: stay cancellable */
			if (i % LLMFDW_INTERRUPT_EVERY == LLMFDW_INTERRUPT_EVERY - 1 &&
				llmfdw_interrupt_pending())
			{
				llmfdw_set_query_canceled();
				item = NULL;
			}
			else
				item = llmfdw_datum_to_python(elems[i], nulls[i], elemtype);
			if (item == NULL)
			{
				/* the unset items are NULL, which a list's deallocation skips */
				llmfdw_free_later(list);
				return NULL;
			}
			PyList_SET_ITEM(list, i, item);
		}
		return list;
	}

	{
		Oid			outfunc;
		bool		varlena;
		char	   *s;

		getTypeOutputInfo(base, &outfunc, &varlena);
		s = OidOutputFunctionCall(outfunc, value);
		return llmfdw_text_to_python(s, -1);
	}
}

/* ---------------------------------------------------------------------
 * Python -> text input format (GIL held; no Postgres errors but OOM)
 * --------------------------------------------------------------------- */

static bool append_value(StringInfo buf, PyObject *value, bool in_array);

/* Append a new reference to a str (NULL: a Python error is set) and drop it. */
static bool
append_new_str(StringInfo buf, PyObject *s)
{
	bool		ok;

	if (s == NULL)
		return false;
	ok = llmfdw_python_to_utf8(s, buf);
	Py_DECREF(s);
	return ok;
}

/* str(value) appended. */
static bool
append_str(StringInfo buf, PyObject *value)
{
	return append_new_str(buf, PyObject_Str(value));
}

/* An array element, double-quoted with backslash escapes. */
static bool
append_array_element(StringInfo buf, PyObject *value)
{
	StringInfoData inner;

	if (value == Py_None)
	{
		appendStringInfoString(buf, "NULL");
		return true;
	}
	if (PyList_Check(value) || PyTuple_Check(value))
		return append_value(buf, value, true);

	initStringInfo(&inner);
	if (!append_value(&inner, value, false))
		return false;
	appendStringInfoChar(buf, '"');
	for (const char *p = inner.data; *p; p++)
	{
		if (*p == '"' || *p == '\\')
			appendStringInfoChar(buf, '\\');
		appendStringInfoChar(buf, *p);
	}
	appendStringInfoChar(buf, '"');
	pfree(inner.data);
	return true;
}

/* A sequence as '{a,b}' (array syntax) or '[a,b]' (vector syntax). */
static bool
append_sequence(StringInfo buf, PyObject *seq, bool array_syntax)
{
	PyObject   *fast = PySequence_Fast(seq, "expected a sequence");
	Py_ssize_t	n;

	if (fast == NULL)
		return false;
	n = PySequence_Fast_GET_SIZE(fast);
	appendStringInfoChar(buf, array_syntax ? '{' : '[');
	for (Py_ssize_t i = 0; i < n; i++)
	{
		PyObject   *item = PySequence_Fast_GET_ITEM(fast, i);
		bool		ok;

		if (i > 0)
			appendStringInfoChar(buf, ',');
		ok = array_syntax ? append_array_element(buf, item) : append_str(buf, item);
		if (!ok)
		{
			Py_DECREF(fast);
			return false;
		}
	}
	appendStringInfoChar(buf, array_syntax ? '}' : ']');
	Py_DECREF(fast);
	return true;
}

/* Append s double-quoted, with backslash escapes (array elements, hstore). */
static void
append_quoted(StringInfo buf, const char *s)
{
	appendStringInfoChar(buf, '"');
	for (const char *p = s; *p; p++)
	{
		if (*p == '"' || *p == '\\')
			appendStringInfoChar(buf, '\\');
		appendStringInfoChar(buf, *p);
	}
	appendStringInfoChar(buf, '"');
}

/*
 * A plain copy of a list or tuple (as a list), numpy values made Python
 * values (their tolist()), so that str() of it reads "[0.5, 1.0]".
 */
static PyObject *
plain_list(PyObject *seq)
{
	PyObject   *fast = PySequence_Fast(seq, "expected a sequence");
	PyObject   *result;
	Py_ssize_t	n;

	if (fast == NULL)
		return NULL;
	n = PySequence_Fast_GET_SIZE(fast);
	result = PyList_New(n);
	for (Py_ssize_t i = 0; result != NULL && i < n; i++)
	{
		PyObject   *item = PySequence_Fast_GET_ITEM(fast, i);
		PyObject   *copy;

		if (PyList_Check(item) || PyTuple_Check(item))
			copy = plain_list(item);
		else if (!PyUnicode_Check(item) && !PyBytes_Check(item) &&
				 PyObject_HasAttrString(item, "tolist"))
			copy = PyObject_CallMethod(item, "tolist", NULL);
		else
			copy = Py_NewRef(item);
		if (copy == NULL)
			Py_CLEAR(result);
		else
			PyList_SET_ITEM(result, i, copy);
	}
	Py_DECREF(fast);
	return result;
}

/* A mapping in hstore's text format: "k"=>"v", "k2"=>NULL (Multicorn2's, None as NULL). */
static bool
append_mapping(StringInfo buf, PyObject *mapping)
{
	PyObject   *items = PyMapping_Items(mapping);
	Py_ssize_t	n;

	if (items == NULL)
		return false;
	n = PyList_GET_SIZE(items);
	for (Py_ssize_t i = 0; i < n; i++)
	{
		PyObject   *pair = PyList_GET_ITEM(items, i);
		StringInfoData part;

		if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2)
		{
			Py_DECREF(items);
			PyErr_SetString(PyExc_TypeError, "mapping items must be (key, value) pairs");
			return false;
		}
		if (i > 0)
			appendStringInfoString(buf, ", ");
		for (int j = 0; j < 2; j++)
		{
			PyObject   *v = PyTuple_GET_ITEM(pair, j);

			if (j == 1)
				appendStringInfoString(buf, "=>");
			if (v == Py_None)
			{
				appendStringInfoString(buf, "NULL");
				continue;
			}
			initStringInfo(&part);
			if (!append_value(&part, v, false))
			{
				Py_DECREF(items);
				return false;
			}
			append_quoted(buf, part.data);
			pfree(part.data);
		}
	}
	Py_DECREF(items);
	return true;
}

static bool
append_value(StringInfo buf, PyObject *value, bool in_array)
{
	if (PyUnicode_Check(value))
		return llmfdw_python_to_utf8(value, buf);
	if (PyBool_Check(value))
	{
		appendStringInfoString(buf, value == Py_True ? "true" : "false");
		return true;
	}
	if (PyBytes_Check(value))
	{
		appendBinaryStringInfo(buf, PyBytes_AS_STRING(value), PyBytes_GET_SIZE(value));
		return true;
	}
	if ((PyList_Check(value) || PyTuple_Check(value)) && in_array)
		return append_sequence(buf, value, true);
	if (PyList_Check(value) || PyTuple_Check(value))
	{
		/* not an array column: str() of the list, as Multicorn2 */
		PyObject   *plain = plain_list(value);
		bool		ok = plain != NULL && append_str(buf, plain);

		Py_XDECREF(plain);
		return ok;
	}
	if (PyDict_Check(value) || (!PySequence_Check(value) && PyMapping_Check(value)))
		return append_mapping(buf, value);
	if (PyObject_HasAttrString(value, "tolist"))
	{
		/* numpy arrays and scalars */
		PyObject   *plain = PyObject_CallMethod(value, "tolist", NULL);
		bool		ok;

		if (plain == NULL)
			return false;
		ok = append_value(buf, plain, in_array);
		Py_DECREF(plain);
		return ok;
	}
	return append_str(buf, value);
}

static bool
append_json(StringInfo buf, PyObject *value)
{
	PyObject   *dumps = llmfdw_import_attr("json", "dumps");
	PyObject   *s;

	if (dumps == NULL)
		return false;
	s = PyObject_CallOneArg(dumps, value);
	Py_DECREF(dumps);
	return append_new_str(buf, s);
}

/* One column's value in its type's text input format. */
static bool
format_value(PyObject *value, LlmfdwColumn *col, StringInfo buf)
{
	if (col->is_json && !PyUnicode_Check(value))
		return append_json(buf, value);
	if (col->is_array && (PyList_Check(value) || PyTuple_Check(value)))
		return append_sequence(buf, value, true);
	return append_value(buf, value, false);
}

/* ---------------------------------------------------------------------
 * Rows
 * --------------------------------------------------------------------- */

/*
 * Step 1 (GIL held): the needed columns of one result item as strings.
 * item is a mapping (missing keys are NULL) or a sequence with exactly one
 * value per column.  Returns false with a Python error set.
 */
bool
llmfdw_row_to_strings(PyObject *item, LlmfdwColumn *columns, int natts,
					  Bitmapset *needed, LlmfdwRowStrings *row)
{
	bool		is_mapping = PyDict_Check(item) || (!PySequence_Check(item) && PyMapping_Check(item));
	Py_ssize_t	live = 0;
	Py_ssize_t	size;

	if (!is_mapping)
	{
		if (!PySequence_Check(item) || PyUnicode_Check(item))
		{
			PyErr_Format(PyExc_TypeError,
						 "a result row must be a dict or a sequence, not %s",
						 Py_TYPE(item)->tp_name);
			return false;
		}
		size = PySequence_Size(item);
		if (size < 0)
			return false;
		for (int i = 0; i < natts; i++)
			if (!columns[i].dropped)
				live++;
		if (size != live)
		{
			PyErr_Format(PyExc_ValueError,
						 "a result row has %zd values but the table has %zd columns",
						 size, live);
			return false;
		}
	}

	for (int i = 0, pos = 0; i < natts; i++)
	{
		LlmfdwColumn *col = &columns[i];
		PyObject   *value;
		StringInfoData buf;

		row->nulls[i] = true;
		if (col->dropped)
			continue;
		pos++;
		if (!bms_is_member(i + 1, needed))
			continue;

		if (is_mapping)
		{
			PyObject   *key = llmfdw_text_to_python(col->name, -1);

			if (key == NULL)
				return false;
			value = PyObject_GetItem(item, key);
			Py_DECREF(key);
			if (value == NULL)
			{
				if (!PyErr_ExceptionMatches(PyExc_KeyError))
					return false;
				PyErr_Clear();
				continue;
			}
		}
		else
			value = PySequence_GetItem(item, pos - 1);
		if (value == NULL)
			return false;
		if (value == Py_None)
		{
			Py_DECREF(value);
			continue;
		}
		if (PyBytes_Check(value) && (col->is_bytea || col->has_recv))
		{
			row->binary[i] = true;
			initStringInfo(&buf);
			appendBinaryStringInfo(&buf, PyBytes_AS_STRING(value), PyBytes_GET_SIZE(value));
		}
		else
		{
			row->binary[i] = false;
			initStringInfo(&buf);
			if (!format_value(value, col, &buf))
			{
				Py_DECREF(value);
				return false;
			}
		}
		Py_DECREF(value);
		row->values[i] = buf.data;
		row->lengths[i] = buf.len;
		row->nulls[i] = false;
	}
	return true;
}

/*
 * Step 2 (GIL not held): parse the strings with each column's input function
 * into the slot.  Errors name the column, so a dimension mismatch reads
 * "column embedding: expected 384 dimensions, not 768".
 */
void
llmfdw_strings_to_slot(TupleTableSlot *slot, LlmfdwColumn *columns,
					   LlmfdwRowStrings *row)
{
	int			natts = slot->tts_tupleDescriptor->natts;

	ExecClearTuple(slot);
	for (int i = 0; i < natts; i++)
	{
		LlmfdwColumn *col = &columns[i];

		slot->tts_isnull[i] = row->nulls[i];
		slot->tts_values[i] = (Datum) 0;
		if (row->nulls[i])
			continue;
		if (row->binary[i] && col->is_bytea)
		{
			bytea	   *b = palloc(VARHDRSZ + row->lengths[i]);

			SET_VARSIZE(b, VARHDRSZ + row->lengths[i]);
			memcpy(VARDATA(b), row->values[i], row->lengths[i]);
			slot->tts_values[i] = PointerGetDatum(b);
			continue;
		}
		{
			ErrorContextCallback errcb;

			errcb.callback = llmfdw_column_error_context;
			errcb.arg = col->name;
			errcb.previous = error_context_stack;
			error_context_stack = &errcb;
			if (row->binary[i])
			{
				StringInfoData buf;

				buf.data = row->values[i];
				buf.len = row->lengths[i];
				buf.maxlen = row->lengths[i] + 1;
				buf.cursor = 0;
				slot->tts_values[i] = ReceiveFunctionCall(&col->recvfunc, &buf,
														  col->ioparam, col->typmod);
			}
			else
			{
				char	   *s = llmfdw_utf8_to_server(row->values[i], row->lengths[i]);

				slot->tts_values[i] = InputFunctionCall(&col->infunc, s,
														col->ioparam, col->typmod);
			}
			error_context_stack = errcb.previous;
		}
	}
	ExecStoreVirtualTuple(slot);
}

void
llmfdw_column_error_context(void *arg)
{
	errcontext("converting the value of column \"%s\" returned by the FDW", (char *) arg);
}

/* A Python set of the names of the columns in attnos. */
PyObject *
llmfdw_column_names(Bitmapset *attnos, LlmfdwColumn *columns)
{
	PyObject   *set = PySet_New(NULL);
	int			attno = -1;

	if (set == NULL)
		return NULL;
	while ((attno = bms_next_member(attnos, attno)) >= 0)
	{
		PyObject   *name = llmfdw_text_to_python(columns[attno - 1].name, -1);
		int			rc = name ? PySet_Add(set, name) : -1;

		Py_XDECREF(name);
		if (rc < 0)
		{
			Py_DECREF(set);
			return NULL;
		}
	}
	return set;
}
