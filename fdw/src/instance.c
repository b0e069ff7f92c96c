/*-------------------------------------------------------------------------
 *
 * instance.c
 *		  Per-table FDW class instances: options, column definitions, and a
 *		  per-backend cache keyed by foreign table and user.
 *
 * The cached instance is rebuilt after its table, server or user mappings
 * change (ALTER FOREIGN TABLE / ALTER SERVER / ALTER USER MAPPING, columns,
 * renames): catalog invalidation callbacks mark entries stale, as
 * postgres_fdw's connection cache does, so a scan of an unchanged table
 * makes no catalog lookups.  The user is part of the key because the user
 * mapping (token, tenant) depends on it, and SET ROLE sends no invalidation.
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
#include "utils/inval.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/rel.h"
#include "utils/syscache.h"

typedef struct InstanceKey
{
	Oid			relid;			/* the foreign table */
	Oid			userid;			/* whose user mapping it was built with */
} InstanceKey;

typedef struct InstanceEntry
{
	InstanceKey key;			/* hash key */
	bool		stale;			/* its catalog entries changed: rebuild */
	uint32		table_hash;		/* its pg_foreign_table row's syscache hash */
	PyObject   *instance;		/* strong reference */
} InstanceEntry;

static HTAB *instances = NULL;

/*
 * Catalog callbacks.  They may run anywhere (no Python here): they only mark
 * entries stale, and the next lookup drops the old instance.  Options of
 * servers and user mappings reach every table, so those mark all entries;
 * a table's own options (pg_foreign_table) and a relcache invalidation mark
 * that table's (hash 0 / InvalidOid: all).
 */
static void
invalidate_table(Datum arg, int cacheid, uint32 hashvalue)
{
	HASH_SEQ_STATUS scan;
	InstanceEntry *entry;

	hash_seq_init(&scan, instances);
	while ((entry = hash_seq_search(&scan)) != NULL)
		if (hashvalue == 0 || entry->table_hash == hashvalue)
			entry->stale = true;
}

static void
invalidate_all(Datum arg, int cacheid, uint32 hashvalue)
{
	HASH_SEQ_STATUS scan;
	InstanceEntry *entry;

	hash_seq_init(&scan, instances);
	while ((entry = hash_seq_search(&scan)) != NULL)
		entry->stale = true;
}

static void
invalidate_rel(Datum arg, Oid relid)
{
	HASH_SEQ_STATUS scan;
	InstanceEntry *entry;

	hash_seq_init(&scan, instances);
	while ((entry = hash_seq_search(&scan)) != NULL)
		if (relid == InvalidOid || entry->key.relid == relid)
			entry->stale = true;
}

static void
init_instance_cache(void)
{
	HASHCTL		ctl;

	ctl.keysize = sizeof(InstanceKey);
	ctl.entrysize = sizeof(InstanceEntry);
	ctl.hcxt = CacheMemoryContext;
	instances = hash_create("llmfdw instances", 16, &ctl,
							HASH_ELEM | HASH_BLOBS | HASH_CONTEXT);
	CacheRegisterSyscacheCallback(FOREIGNSERVEROID, invalidate_all, (Datum) 0);
	CacheRegisterSyscacheCallback(USERMAPPINGOID, invalidate_all, (Datum) 0);
	CacheRegisterSyscacheCallback(FOREIGNTABLEREL, invalidate_table, (Datum) 0);
	CacheRegisterRelcacheCallback(invalidate_rel, (Datum) 0);
}

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
 * The FDW class of a server without a wrapper option: the llm.* tables.
 * Needing no option keeps the common server free of the superuser-only
 * wrapper option.
 */
#define LLMFDW_DEFAULT_WRAPPER "llm_tables.tables.SidecarTables"

/* The server's wrapper option, else the default class. */
static char *
server_wrapper(ForeignServer *server)
{
	ListCell   *lc;

	foreach(lc, server->options)
	{
		DefElem    *def = lfirst(lc);

		if (strcmp(def->defname, "wrapper") == 0)
			return defGetString(def);
	}
	return LLMFDW_DEFAULT_WRAPPER;
}

/*
 * Table options, then server options, then user-mapping options: for a
 * duplicate key the later source wins (Multicorn's order).  *wrapper is the
 * server's wrapper option, else the default class.
 */
static List *
all_options(Oid foreigntableid, char **wrapper)
{
	ForeignTable *table = GetForeignTable(foreigntableid);
	ForeignServer *server = GetForeignServer(table->serverid);
	List	   *merged = NIL;

	merged = list_concat(merged, table->options);
	merged = list_concat(merged, server->options);
	merged = list_concat(merged, user_mapping_options(server->serverid));

	*wrapper = server_wrapper(server);
	return merged;
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

/*
 * A Python dict from a DefElem list; later keys overwrite earlier ones.
 * Returns NULL with a Python exception set.
 */
static PyObject *
options_dict(List *options, bool skip_wrapper)
{
	PyObject   *dict = PyDict_New();
	ListCell   *lc;

	if (dict == NULL)
		return NULL;
	foreach(lc, options)
	{
		DefElem    *def = lfirst(lc);
		PyObject   *key;
		PyObject   *value = NULL;
		int			rc = -1;

		if (skip_wrapper && strcmp(def->defname, "wrapper") == 0)
			continue;
		key = llmfdw_text_to_python(def->defname, -1);
		if (key != NULL)
			value = llmfdw_text_to_python(defGetString(def), -1);
		if (value != NULL)
			rc = PyDict_SetItem(dict, key, value);
		Py_XDECREF(key);
		Py_XDECREF(value);
		if (rc < 0)
		{
			Py_DECREF(dict);
			return NULL;
		}
	}
	return dict;
}

/* One multicorn.ColumnDefinition; NULL with a Python exception set. */
static PyObject *
column_definition(PyObject *coldef, PyObject *name, Oid foreigntableid,
				  Form_pg_attribute att)
{
	PyObject   *args = NULL;
	PyObject   *kwargs = NULL;
	PyObject   *result = NULL;
	PyObject   *item;
	const char *type_name = format_type_with_typemod(att->atttypid, att->atttypmod);
	const char *base_type_name = format_type_be(att->atttypid);

	args = PyTuple_Pack(1, name);
	kwargs = args ? PyDict_New() : NULL;
	if (kwargs == NULL)
		goto done;

#define SET_KWARG(key, expr) \
	do { \
		item = (expr); \
		if (item == NULL || PyDict_SetItemString(kwargs, (key), item) < 0) \
		{ \
			Py_XDECREF(item); \
			goto done; \
		} \
		Py_DECREF(item); \
	} while (0)

	SET_KWARG("type_oid", PyLong_FromUnsignedLong(att->atttypid));
	SET_KWARG("typmod", PyLong_FromLong(att->atttypmod));
	SET_KWARG("type_name", llmfdw_text_to_python(type_name, -1));
	SET_KWARG("base_type_name", llmfdw_text_to_python(base_type_name, -1));
	SET_KWARG("options",
			  options_dict(GetForeignColumnOptions(foreigntableid, att->attnum), false));
#undef SET_KWARG

	result = PyObject_Call(coldef, args, kwargs);
done:
	Py_XDECREF(args);
	Py_XDECREF(kwargs);
	return result;
}

/*
 * OrderedDict name -> multicorn.ColumnDefinition, in column order.  Filled
 * through the mapping protocol: PyDict_SetItem on an OrderedDict would store
 * the key without entering it into the order, so keys() would miss it.
 */
static PyObject *
column_definitions(Oid foreigntableid, TupleDesc desc)
{
	PyObject   *ordered = llmfdw_import_attr("collections", "OrderedDict");
	PyObject   *coldef = ordered ? llmfdw_multicorn_attr("ColumnDefinition") : NULL;
	PyObject   *result = NULL;

	if (coldef == NULL)
		goto done;
	result = PyObject_CallNoArgs(ordered);
	if (result == NULL)
		goto done;

	for (int i = 0; i < desc->natts; i++)
	{
		Form_pg_attribute att = TupleDescAttr(desc, i);
		PyObject   *name;
		PyObject   *def = NULL;
		int			rc = -1;

		if (att->attisdropped)
			continue;
		name = llmfdw_text_to_python(NameStr(att->attname), -1);
		if (name != NULL)
			def = column_definition(coldef, name, foreigntableid, att);
		if (def != NULL)
			rc = PyObject_SetItem(result, name, def);
		Py_XDECREF(name);
		Py_XDECREF(def);
		if (rc < 0)
		{
			Py_CLEAR(result);
			goto done;
		}
	}
done:
	Py_XDECREF(ordered);
	Py_XDECREF(coldef);
	return result;
}

/* Import "package.module.Class"; NULL with a Python exception set. */
static PyObject *
wrapper_class(const char *wrapper)
{
	const char *dot = strrchr(wrapper, '.');
	PyObject   *module_name;
	PyObject   *class_name = NULL;
	PyObject   *module = NULL;
	PyObject   *cls = NULL;

	if (dot == NULL || dot == wrapper || dot[1] == '\0')
	{
		PyObject   *name = llmfdw_text_to_python(wrapper, -1);

		if (name != NULL)
			PyErr_Format(PyExc_ValueError,
						 "wrapper '%U' must be a dotted path: package.module.Class", name);
		Py_XDECREF(name);
		return NULL;
	}
	module_name = llmfdw_text_to_python(wrapper, dot - wrapper);
	if (module_name != NULL)
		class_name = llmfdw_text_to_python(dot + 1, -1);
	if (class_name != NULL)
		module = PyImport_Import(module_name);
	if (module != NULL)
		cls = PyObject_GetAttr(module, class_name);
	Py_XDECREF(module_name);
	Py_XDECREF(class_name);
	Py_XDECREF(module);
	return cls;
}

/*
 * Tell the instance the names the user knows it by (our addition to the
 * Multicorn API: Multicorn passes only options and columns), so that hints
 * in its errors name the user's own table and server.  Classes that refuse
 * new attributes (__slots__) just go without.  False with a Python
 * exception set on a real failure.
 */
static bool
set_names(PyObject *instance, Oid foreigntableid)
{
	ForeignServer *server = GetForeignServer(GetForeignTable(foreigntableid)->serverid);
	const char *names[2][2] = {
		{"_llmfdw_table", quote_qualified_identifier(get_namespace_name(get_rel_namespace(foreigntableid)),
													 get_rel_name(foreigntableid))},
		{"_llmfdw_server", quote_identifier(server->servername)},
	};

	for (int i = 0; i < 2; i++)
	{
		PyObject   *value = llmfdw_text_to_python(names[i][1], -1);
		int			rc = value ? PyObject_SetAttrString(instance, names[i][0], value) : -1;

		Py_XDECREF(value);
		if (rc < 0)
		{
			if (!PyErr_ExceptionMatches(PyExc_AttributeError))
				return false;
			PyErr_Clear();
		}
	}
	return true;
}

/*
 * IMPORT FOREIGN SCHEMA: the server's wrapper class's import_schema(schema,
 * srv_options, options, restriction_type, restricts), Multicorn's API, gives
 * TableDefinitions whose to_statement() is each CREATE FOREIGN TABLE.  The
 * server options handed over include the current user's mapping (its token),
 * since asking the sidecar what it serves may need it.  Postgres itself
 * applies LIMIT TO / EXCEPT to the result, and puts each table in the local
 * schema and on this server.
 */
List *
llmfdw_import_foreign_schema(ImportForeignSchemaStmt *stmt, Oid serverOid)
{
	ForeignServer *server = GetForeignServer(serverOid);
	char	   *wrapper = server_wrapper(server);
	List	   *options = list_concat(list_copy(server->options), user_mapping_options(serverOid));
	List	   *result = NIL;
	LlmfdwPyState st;

	LLMFDW_WITH_PYTHON(st);
	{
		PyObject   *cls = wrapper_class(wrapper);
		PyObject   *srv = cls ? options_dict(options, true) : NULL;
		PyObject   *opts = srv ? options_dict(stmt->options, false) : NULL;
		PyObject   *names = opts ? PyList_New(0) : NULL;
		PyObject   *tables = NULL;
		PyObject   *iter = NULL;
		PyObject   *item;
		ListCell   *lc;
		const char *restriction = stmt->list_type == FDW_IMPORT_SCHEMA_LIMIT_TO ? "limit" :
			stmt->list_type == FDW_IMPORT_SCHEMA_EXCEPT ? "except" : NULL;

		foreach(lc, stmt->table_list)
		{
			PyObject   *name = names ? llmfdw_text_to_python(((RangeVar *) lfirst(lc))->relname, -1) : NULL;

			if (name == NULL || PyList_Append(names, name) < 0)
				Py_CLEAR(names);
			Py_XDECREF(name);
		}
		if (names != NULL)
		{
			PyObject   *schema = llmfdw_text_to_python(stmt->remote_schema, -1);

			if (schema != NULL)
				tables = PyObject_CallMethod(cls, "import_schema", "OOOzO", schema, srv, opts,
											 restriction, names);
			Py_XDECREF(schema);
		}
		Py_XDECREF(cls);
		Py_XDECREF(srv);
		Py_XDECREF(opts);
		Py_XDECREF(names);
		if (tables != NULL)
		{
			iter = PyObject_GetIter(tables);
			Py_DECREF(tables);
		}
		if (iter == NULL)
			llmfdw_raise_python_error(&st, psprintf("calling import_schema() of %s", wrapper));
		while ((item = PyIter_Next(iter)) != NULL)
		{
			PyObject   *stmt_text = PyObject_CallMethod(item, "to_statement", "ss",
														 stmt->local_schema, server->servername);
			char	   *sql = stmt_text ? llmfdw_python_to_server(stmt_text) : NULL;

			Py_XDECREF(stmt_text);
			Py_DECREF(item);
			if (sql == NULL)
				break;
			result = lappend(result, sql);
		}
		Py_DECREF(iter);
		if (PyErr_Occurred())
			llmfdw_raise_python_error(&st, psprintf("calling import_schema() of %s", wrapper));
	}
	LLMFDW_END_PYTHON(st);
	return result;
}

/*
 * The validator's check of options against the llm.* tables' declarations:
 * llm_tables.options.<func>(dict).  Only ever our own module, never a name
 * from an option, so any role's DDL may run it.
 */
void
llmfdw_check_options(const char *func, List *options)
{
	LlmfdwPyState st;

	LLMFDW_WITH_PYTHON(st);
	{
		PyObject   *check = llmfdw_import_attr("llm_tables.options", func);
		PyObject   *dict = check ? options_dict(options, true) : NULL;
		PyObject   *res = dict ? PyObject_CallOneArg(check, dict) : NULL;

		Py_XDECREF(check);
		Py_XDECREF(dict);
		if (res == NULL)
			llmfdw_raise_python_error(&st, "checking the options");
		Py_DECREF(res);
	}
	LLMFDW_END_PYTHON(st);
}

/*
 * The FDW instance for a foreign table: cached, rebuilt when anything it was
 * built from changed.  Returns a new reference; call with the GIL NOT held.
 */
PyObject *
llmfdw_get_instance(Oid foreigntableid)
{
	InstanceKey key;
	InstanceEntry *entry;
	bool		found;
	PyObject   *instance = NULL;
	LlmfdwPyState st;

	if (instances == NULL)
		init_instance_cache();

	key.relid = foreigntableid;
	key.userid = GetUserId();
	entry = hash_search(instances, &key, HASH_ENTER, &found);
	if (!found)
	{
		entry->instance = NULL;
		entry->stale = true;
		entry->table_hash = GetSysCacheHashValue1(FOREIGNTABLEREL, ObjectIdGetDatum(foreigntableid));
	}

	if (!entry->stale)
	{
		LLMFDW_WITH_PYTHON(st);
		{
			instance = entry->instance;
			Py_INCREF(instance);
		}
		LLMFDW_END_PYTHON(st);
		return instance;
	}

	{
		char	   *wrapper;
		List	   *options = all_options(foreigntableid, &wrapper);
		Relation	rel = table_open(foreigntableid, AccessShareLock);
		TupleDesc	desc = CreateTupleDescCopy(RelationGetDescr(rel));

		table_close(rel, AccessShareLock);
		LLMFDW_WITH_PYTHON(st);
		{
			PyObject   *cls = wrapper_class(wrapper);
			PyObject   *pyopts = NULL;
			PyObject   *pycols = NULL;

			if (cls != NULL)
				pyopts = options_dict(options, true);
			if (pyopts != NULL)
				pycols = column_definitions(foreigntableid, desc);
			if (pycols != NULL)
				instance = PyObject_CallFunctionObjArgs(cls, pyopts, pycols, NULL);
			if (instance != NULL && !set_names(instance, foreigntableid))
				Py_CLEAR(instance);
			Py_XDECREF(cls);
			Py_XDECREF(pyopts);
			Py_XDECREF(pycols);
			if (instance == NULL)
				llmfdw_raise_python_error(&st, psprintf("creating the FDW instance (%s) for foreign table \"%s\"",
														wrapper, get_rel_name(foreigntableid)));

			Py_XDECREF(entry->instance);
			entry->instance = instance;
			Py_INCREF(instance);
		}
		LLMFDW_END_PYTHON(st);
	}

	/*
	 * Only now: an invalidation that arrived while it was being built (the
	 * table_open above processes them) has already been applied.
	 */
	entry->stale = false;
	return instance;
}

/* The attnum of the live column with this name (server encoding), or 0. */
AttrNumber
llmfdw_attnum_by_name(LlmfdwColumn *columns, int natts, const char *name)
{
	for (int i = 0; i < natts; i++)
		if (!columns[i].dropped && strcmp(columns[i].name, name) == 0)
			return i + 1;
	return InvalidAttrNumber;
}

/*
 * The attnums of the columns that a class attribute (an iterable of str:
 * request_columns, batch_key_columns) names, without repeats; NIL if the
 * class has no such attribute.  The names are converted to the server
 * encoding before they are compared with attnames: in a LATIN1 database
 * "clé" is not the UTF-8 bytes Python's C API gives.  Names that are not
 * str, or that name no column, are left out: a class may declare columns
 * that this table does not have.
 */
List *
llmfdw_attnums_of(PyObject *instance, const char *attr, LlmfdwColumn *columns, int natts)
{
	List	   *result = NIL;
	LlmfdwPyState st;

	LLMFDW_WITH_PYTHON(st);
	{
		PyObject   *names;
		PyObject   *iter;
		PyObject   *name;

		if (!PyObject_HasAttrString(instance, attr))
			goto done;
		names = PyObject_GetAttrString(instance, attr);
		iter = names ? PyObject_GetIter(names) : NULL;
		Py_XDECREF(names);
		if (iter == NULL)
			llmfdw_raise_python_error(&st, psprintf("reading %s", attr));
		while ((name = PyIter_Next(iter)) != NULL)
		{
			const char *s = PyUnicode_Check(name) ? llmfdw_python_to_server(name) : NULL;
			AttrNumber	attnum = s ? llmfdw_attnum_by_name(columns, natts, s) : InvalidAttrNumber;

			Py_DECREF(name);
			PyErr_Clear();
			if (attnum != InvalidAttrNumber)
				result = list_append_unique_int(result, attnum);
		}
		Py_DECREF(iter);
		if (PyErr_Occurred())
			llmfdw_raise_python_error(&st, psprintf("reading %s", attr));
done:
		;
	}
	LLMFDW_END_PYTHON(st);
	return result;
}
