/*-------------------------------------------------------------------------
 *
 * option.c
 *		  The validator of llmfdw: where each option with a meaning to the
 *		  host or to the llm.* tables may be set, and by whom.
 *
 *-------------------------------------------------------------------------
 */
#include "llmfdw.h"

#include "access/reloptions.h"
#include "catalog/pg_attribute.h"
#include "catalog/pg_foreign_server.h"
#include "catalog/pg_foreign_table.h"
#include "catalog/pg_user_mapping.h"
#include "commands/defrem.h"
#include "miscadmin.h"

PG_FUNCTION_INFO_V1(llmfdw_validator);

/*
 * Where each option with a meaning to the host or to the llm.* tables may be
 * set, as contrib/postgres_fdw's option table does.  Options that choose
 * what a backend runs or reaches (wrapper, address, timeout) belong to the
 * server, whose owner is an administrator; wrapper names Python code every
 * backend imports, so only a superuser sets it, and the validator never
 * imports anything for anyone else; the TLS files (tls_ca_file, ...) are
 * read by every backend as the server's OS user, so they are a superuser's
 * too.  A user mapping holds its role's token.  The tenant (on the server or
 * a user mapping) is whom the sidecar meters and, with auth off, believes:
 * one chosen by a role would let it act as any tenant, so only a superuser
 * sets it, at either level.  Since the validator sees the whole option list,
 * a server or mapping that has one (or TLS files) is a superuser's to change
 * afterwards, as postgres_fdw's password_required is.  Other options
 * (request defaults, options of other FDW classes) are checked by the FDW
 * class.
 */
typedef struct LlmfdwOption
{
	const char *name;
	Oid			catalog;		/* where it may be set */
	const char *superuser_only; /* why only a superuser may, or NULL */
} LlmfdwOption;

#define NAMES_CODE "It names Python code that every backend using the server imports."
#define PICKS_TENANT "A tenant chosen by a role would let it act as any tenant. " \
	"Without one, requests are metered to the database's name."
#define NAMES_FILE "It names a file on the database host that every backend using the server reads."

static const LlmfdwOption reserved_options[] = {
	{"wrapper", ForeignServerRelationId, NAMES_CODE},
	{"address", ForeignServerRelationId, NULL},
	{"timeout", ForeignServerRelationId, NULL},
	{"tenant", ForeignServerRelationId, PICKS_TENANT},
	{"tenant", UserMappingRelationId, PICKS_TENANT},
	{"token", UserMappingRelationId, NULL},
	{"tls_ca_file", ForeignServerRelationId, NAMES_FILE},
	{"tls_cert_file", ForeignServerRelationId, NAMES_FILE},
	{"tls_key_file", ForeignServerRelationId, NAMES_FILE},
	{"tls_server_name", ForeignServerRelationId, NULL},
	{"table", ForeignTableRelationId, NULL},
	{NULL, InvalidOid, NULL}
};

static const char *
catalog_noun(Oid catalog)
{
	switch (catalog)
	{
		case ForeignServerRelationId:
			return "a foreign server";
		case UserMappingRelationId:
			return "a user mapping";
		case ForeignTableRelationId:
			return "a foreign table";
		case AttributeRelationId:
			return "a column";
		default:
			return "a foreign-data wrapper";
	}
}

/* Refuse a reserved option set where it does not belong, or by whom it may not be. */
static void
check_reserved_option(DefElem *def, Oid catalog)
{
	const LlmfdwOption *home = NULL;

	for (const LlmfdwOption *opt = reserved_options; opt->name != NULL; opt++)
	{
		if (strcmp(opt->name, def->defname) != 0)
			continue;
		if (opt->catalog == catalog)
		{
			if (opt->superuser_only != NULL && !superuser())
				ereport(ERROR,
						(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
						 errmsg("only a superuser may set option \"%s\" on %s",
								def->defname, catalog_noun(catalog)),
						 errdetail("%s", opt->superuser_only)));
			return;
		}
		home = opt;
	}
	if (home != NULL)
		ereport(ERROR,
				(errcode(ERRCODE_FDW_INVALID_OPTION_NAME),
				 errmsg("option \"%s\" belongs on %s, not on %s",
						def->defname, catalog_noun(home->catalog), catalog_noun(catalog)),
				 home->catalog == ForeignServerRelationId
				 ? errhint("ALTER SERVER name OPTIONS (ADD %s '...');", def->defname)
				 : home->catalog == UserMappingRelationId
				 ? errhint("ALTER USER MAPPING FOR role SERVER name OPTIONS (ADD %s '...');", def->defname)
				 : errhint("ALTER FOREIGN TABLE name OPTIONS (ADD %s '...');", def->defname)));
}

/*
 * Reserved options at their level; a wrapper class set by a superuser must
 * import, so a typo fails at CREATE SERVER, not at the first query.
 * Without a wrapper option the server runs llmfdw's own tables.
 */
Datum
llmfdw_validator(PG_FUNCTION_ARGS)
{
	List	   *options = untransformRelOptions(PG_GETARG_DATUM(0));
	Oid			catalog = PG_GETARG_OID(1);
	char	   *wrapper = NULL;
	ListCell   *lc;
	LlmfdwPyState st;

	bool		has_table = false;

	foreach(lc, options)
	{
		DefElem    *def = lfirst(lc);

		check_reserved_option(def, catalog);
		if (strcmp(def->defname, "wrapper") == 0)
			wrapper = defGetString(def);
		has_table |= (strcmp(def->defname, "table") == 0);
	}

	/*
	 * Options of llmfdw's own tables are checked against their declarations
	 * now, so that ALTER ... OPTIONS (ADD colour 'blue') fails at once: a
	 * server without a wrapper class runs them, and the table option names
	 * one of them.  Another class checks its own options when it runs.
	 */
	if (catalog == ForeignServerRelationId && wrapper == NULL)
		llmfdw_check_options("check_server_options", options);
	if (catalog == ForeignTableRelationId && has_table)
		llmfdw_check_options("check_table_options", options);

	if (wrapper != NULL)
	{
		LLMFDW_WITH_PYTHON(st);
		{
			const char *dot = strrchr(wrapper, '.');
			PyObject   *cls = NULL;

			if (dot != NULL && dot != wrapper && dot[1] != '\0')
				cls = llmfdw_import_attr(pnstrdup(wrapper, dot - wrapper), dot + 1);
			else
				PyErr_Format(PyExc_ValueError,
							 "wrapper '%s' must be a dotted path: package.module.Class", wrapper);
			if (cls == NULL)
				llmfdw_raise_python_error(&st, psprintf("importing wrapper class %s", wrapper));
			Py_DECREF(cls);
		}
		LLMFDW_END_PYTHON(st);
	}
	PG_RETURN_VOID();
}
