/*-------------------------------------------------------------------------
 *
 * instance.c
 *		  Per-table FDW class instances: options, column definitions, and a
 *		  per-backend cache keyed by foreign table OID.
 *
 * The cached instance is rebuilt when the table's options, its server's or
 * user mapping's options, or its columns change (ALTER FOREIGN TABLE / ALTER
 * SERVER / ALTER USER MAPPING): each lookup rebuilds a signature of all of
 * them and compares.  That costs a few catalog-cache lookups per scan and
 * never serves a stale instance.
 *
 *-------------------------------------------------------------------------
 */
#include "llmfdw.h"

#include "access/htup_details.h"
#include "access/reloptions.h"
#include "access/table.h"
#include "catalog/pg_type.h"
#include "catalog/pg_user_mapping.h"
#include "commands/defrem.h"
#include "foreign/foreign.h"
#include "lib/stringinfo.h"
#include "miscadmin.h"
#include "utils/builtins.h"
#include "utils/hsearch.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/rel.h"
#include "utils/syscache.h"

typedef struct InstanceEntry
{
	Oid			relid;			/* hash key */
	char	   *signature;		/* in CacheMemoryContext */
	PyObject   *instance;		/* strong reference */
} InstanceEntry;

static HTAB *instances = NULL;

/* Options of the user mapping for the current user, else PUBLIC, else none. */
static List *
user_mapping_options(Oid serverid)
{
	HeapTuple	tp;
	Datum		datum;
	bool		isnull;
	List	   *options = NIL;
	Oid			users[2] = {GetUserId(), InvalidOid};

	for (int i = 0; i < 2; i++)
	{
		tp = SearchSysCache2(USERMAPPINGUSERSERVER,
							 ObjectIdGetDatum(users[i]),
							 ObjectIdGetDatum(serverid));
		if (!HeapTupleIsValid(tp))
			continue;
		datum = SysCacheGetAttr(USERMAPPINGUSERSERVER, tp,
								Anum_pg_user_mapping_umoptions, &isnull);
		if (!isnull)
			options = untransformRelOptions(datum);
		ReleaseSysCache(tp);
		break;
	}
	return options;
}

/*
 * Table options, then server options, then user-mapping options: for a
 * duplicate key the later source wins (Multicorn's order).
 */
static List *
all_options(Oid foreigntableid, char **wrapper)
{
	ForeignTable *table = GetForeignTable(foreigntableid);
	ForeignServer *server = GetForeignServer(table->serverid);
	List	   *merged = NIL;
	ListCell   *lc;

	merged = list_concat(merged, table->options);
	merged = list_concat(merged, server->options);
	merged = list_concat(merged, user_mapping_options(server->serverid));

	*wrapper = NULL;
	foreach(lc, server->options)
	{
		DefElem    *def = lfirst(lc);

		if (strcmp(def->defname, "wrapper") == 0)
			*wrapper = defGetString(def);
	}
	if (*wrapper == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_FDW_OPTION_NAME_NOT_FOUND),
				 errmsg("foreign server \"%s\" has no wrapper option", server->servername),
				 errhint("ALTER SERVER %s OPTIONS (ADD wrapper 'package.module.Class').",
						 quote_identifier(server->servername))));
	return merged;
}

/* A named option of the table's server, or NULL (for EXPLAIN). */
const char *
llmfdw_server_option(Oid foreigntableid, const char *name)
{
	ForeignServer *server = GetForeignServer(GetForeignTable(foreigntableid)->serverid);
	ListCell   *lc;

	foreach(lc, server->options)
	{
		DefElem    *def = lfirst(lc);

		if (strcmp(def->defname, name) == 0)
			return defGetString(def);
	}
	return NULL;
}

/* Conversion facts for every attribute of a tuple descriptor. */
LlmfdwColumn *
llmfdw_columns(TupleDesc desc)
{
	LlmfdwColumn *cols = palloc0(sizeof(LlmfdwColumn) * desc->natts);

	for (int i = 0; i < desc->natts; i++)
	{
		Form_pg_attribute att = TupleDescAttr(desc, i);
		LlmfdwColumn *col = &cols[i];
		Oid			infunc;
		Oid			base;

		col->name = pstrdup(NameStr(att->attname));
		col->dropped = att->attisdropped;
		if (col->dropped)
			continue;
		col->typid = att->atttypid;
		col->typmod = att->atttypmod;
		base = getBaseType(att->atttypid);
		col->is_array = OidIsValid(get_element_type(base));
		col->is_json = (base == JSONOID || base == JSONBOID);
		col->is_bytea = (base == BYTEAOID);
		getTypeInputInfo(att->atttypid, &infunc, &col->ioparam);
		fmgr_info(infunc, &col->infunc);
		{
			Oid			recvfunc;
			Oid			recvparam;
			HeapTuple	tp = SearchSysCache1(TYPEOID, ObjectIdGetDatum(att->atttypid));

			col->has_recv = false;
			if (HeapTupleIsValid(tp))
			{
				col->has_recv = OidIsValid(((Form_pg_type) GETSTRUCT(tp))->typreceive);
				ReleaseSysCache(tp);
			}
			if (col->has_recv)
			{
				getTypeBinaryInputInfo(att->atttypid, &recvfunc, &recvparam);
				fmgr_info(recvfunc, &col->recvfunc);
			}
		}
	}
	return cols;
}

/* Everything the instance depends on, as one comparable string. */
static char *
signature(Oid foreigntableid, List *options, TupleDesc desc)
{
	StringInfoData buf;
	ListCell   *lc;

	initStringInfo(&buf);
	foreach(lc, options)
	{
		DefElem    *def = lfirst(lc);

		appendStringInfo(&buf, "%s=%s\n", def->defname, defGetString(def));
	}
	for (int i = 0; i < desc->natts; i++)
	{
		Form_pg_attribute att = TupleDescAttr(desc, i);
		List	   *colopts;

		if (att->attisdropped)
			continue;
		appendStringInfo(&buf, "col %s %u %d", NameStr(att->attname),
						 att->atttypid, att->atttypmod);
		colopts = GetForeignColumnOptions(foreigntableid, att->attnum);
		foreach(lc, colopts)
		{
			DefElem    *def = lfirst(lc);

			appendStringInfo(&buf, " %s=%s", def->defname, defGetString(def));
		}
		appendStringInfoChar(&buf, '\n');
	}
	return buf.data;
}

/* A Python dict from a DefElem list; later keys overwrite earlier ones. */
static PyObject *
options_dict(List *options, bool skip_wrapper)
{
	PyObject   *dict = PyDict_New();
	ListCell   *lc;

	foreach(lc, options)
	{
		DefElem    *def = lfirst(lc);
		PyObject   *value;

		if (skip_wrapper && strcmp(def->defname, "wrapper") == 0)
			continue;
		value = PyUnicode_FromString(defGetString(def));
		PyDict_SetItemString(dict, def->defname, value);
		Py_DECREF(value);
	}
	return dict;
}

/* OrderedDict name -> multicorn.ColumnDefinition, in column order. */
static PyObject *
column_definitions(Oid foreigntableid, TupleDesc desc)
{
	PyObject   *ordered = llmfdw_import_attr("collections", "OrderedDict");
	PyObject   *coldef = llmfdw_multicorn_attr("ColumnDefinition");
	PyObject   *result = NULL;

	if (ordered == NULL || coldef == NULL)
		goto done;
	result = PyObject_CallNoArgs(ordered);
	if (result == NULL)
		goto done;

	for (int i = 0; i < desc->natts; i++)
	{
		Form_pg_attribute att = TupleDescAttr(desc, i);
		PyObject   *args;
		PyObject   *kwargs;
		PyObject   *opts;
		PyObject   *def;

		if (att->attisdropped)
			continue;
		opts = options_dict(GetForeignColumnOptions(foreigntableid, att->attnum), false);
		args = Py_BuildValue("(s)", NameStr(att->attname));
		kwargs = Py_BuildValue("{s:I,s:i,s:s,s:s,s:N}",
							   "type_oid", (unsigned int) att->atttypid,
							   "typmod", (int) att->atttypmod,
							   "type_name", format_type_with_typemod(att->atttypid, att->atttypmod),
							   "base_type_name", format_type_be(att->atttypid),
							   "options", opts);
		def = PyObject_Call(coldef, args, kwargs);
		Py_DECREF(args);
		Py_DECREF(kwargs);
		if (def == NULL || PyDict_SetItemString(result, NameStr(att->attname), def) < 0)
		{
			Py_XDECREF(def);
			Py_CLEAR(result);
			goto done;
		}
		Py_DECREF(def);
	}
done:
	Py_XDECREF(ordered);
	Py_XDECREF(coldef);
	return result;
}

/* Import "package.module.Class". */
static PyObject *
wrapper_class(const char *wrapper)
{
	const char *dot = strrchr(wrapper, '.');
	char	   *module;

	if (dot == NULL || dot == wrapper || dot[1] == '\0')
	{
		PyErr_Format(PyExc_ValueError,
					 "wrapper '%s' must be a dotted path: package.module.Class", wrapper);
		return NULL;
	}
	module = pnstrdup(wrapper, dot - wrapper);
	return llmfdw_import_attr(module, dot + 1);
}

/*
 * The FDW instance for a foreign table: cached, rebuilt when anything it was
 * built from changed.  Returns a new reference; call with the GIL NOT held.
 */
PyObject *
llmfdw_get_instance(Oid foreigntableid)
{
	InstanceEntry *entry;
	bool		found;
	char	   *wrapper;
	List	   *options;
	Relation	rel;
	TupleDesc	desc;
	char	   *sig;
	PyObject   *instance = NULL;
	LlmfdwPyState st;

	if (instances == NULL)
	{
		HASHCTL		ctl;

		ctl.keysize = sizeof(Oid);
		ctl.entrysize = sizeof(InstanceEntry);
		ctl.hcxt = CacheMemoryContext;
		instances = hash_create("llmfdw instances", 16, &ctl,
								HASH_ELEM | HASH_BLOBS | HASH_CONTEXT);
	}

	options = all_options(foreigntableid, &wrapper);
	rel = table_open(foreigntableid, AccessShareLock);
	desc = CreateTupleDescCopy(RelationGetDescr(rel));
	table_close(rel, AccessShareLock);
	sig = signature(foreigntableid, options, desc);

	entry = hash_search(instances, &foreigntableid, HASH_ENTER, &found);
	if (!found)
	{
		entry->signature = NULL;
		entry->instance = NULL;
	}

	LLMFDW_WITH_PYTHON(st);
	{
		if (entry->instance != NULL && strcmp(entry->signature, sig) == 0)
		{
			instance = entry->instance;
			Py_INCREF(instance);
		}
		else
		{
			PyObject   *cls = wrapper_class(wrapper);
			PyObject   *pyopts = NULL;
			PyObject   *pycols = NULL;

			if (cls != NULL)
			{
				pyopts = options_dict(options, true);
				pycols = column_definitions(foreigntableid, desc);
			}
			if (pycols != NULL)
				instance = PyObject_CallFunctionObjArgs(cls, pyopts, pycols, NULL);
			Py_XDECREF(cls);
			Py_XDECREF(pyopts);
			Py_XDECREF(pycols);
			if (instance == NULL)
				llmfdw_raise_python_error(&st, psprintf("creating the FDW instance (%s) for foreign table \"%s\"",
														wrapper, get_rel_name(foreigntableid)));

			Py_XDECREF(entry->instance);
			if (entry->signature)
				pfree(entry->signature);
			entry->instance = instance;
			entry->signature = MemoryContextStrdup(CacheMemoryContext, sig);
			Py_INCREF(instance);
		}
	}
	LLMFDW_END_PYTHON(st);

	return instance;
}
