//! The analysts' SQL dialect, parsed with `sqlparser` and turned at once
//! into the project's own [`SqlPlan`].
//!
//! ```sql
//! SELECT b.category, COUNT(DISTINCT b.customer) AS customers, SUM(b.amount) AS spend
//! FROM bank b JOIN platform p
//! WHERE b.date BETWEEN :start AND :end AND p.segment IN ('messenger_active')
//! GROUP BY b.category, p.country
//! ```
//!
//! - The join is implicit (on the collaboration's identifier columns): no
//!   `ON`/`USING`, and no identifier column may be selected, grouped or
//!   filtered (`customer` only inside `COUNT(DISTINCT ...)`).
//! - Aggregates: `COUNT(DISTINCT customer)`, `COUNT(*)`, `SUM` and `AVG` of
//!   holder money columns (`AVG` becomes two noisy cells and their ratio).
//! - `GROUP BY` declared-domain columns of either side; `WHERE` comparisons,
//!   `IN` and `BETWEEN` on holder columns and `=`/`IN` on matcher
//!   categorical columns, joined by `AND`.
//! - Values are literals or `:name` placeholders bound from parameters.
//!
//! Everything else is refused with a message that names the offending part.

use std::collections::BTreeMap;

use sqlparser::ast::{
    BinaryOperator, DuplicateTreatment, Expr, FunctionArg, FunctionArgExpr, FunctionArguments, GroupByExpr, InTarget,
    JoinConstraint, JoinOperator, ObjectNamePart, SelectItem, SetExpr, Statement, TableFactor, Value,
};
use sqlparser::dialect::GenericDialect;
use sqlparser::parser::Parser;

/// The longest query text accepted.
pub const MAX_SQL_LEN: usize = 8192;

/// A refusal, in words that say what to change.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SqlError(pub String);

fn refuse<T>(msg: impl Into<String>) -> Result<T, SqlError> {
    Err(SqlError(msg.into()))
}

/// Which party a column belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Side {
    /// The bank.
    Holder,
    /// The platform.
    Matcher,
}

/// What a column is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ColumnKind {
    /// An identifier (never selected, grouped or filtered).
    Identifier,
    /// The holder's customer key (only inside `COUNT(DISTINCT ...)`).
    Customer,
    /// A categorical column with its declared public domain.
    Categorical(Vec<String>),
    /// A decimal money column (cents).
    Money,
    /// A date column.
    Date,
}

/// The two tables and their columns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Schema {
    /// The holder's table name (`bank`).
    pub holder_table: String,
    /// The matcher's table name (`platform`).
    pub matcher_table: String,
    /// Holder columns.
    pub holder: Vec<(String, ColumnKind)>,
    /// Matcher columns.
    pub matcher: Vec<(String, ColumnKind)>,
}

impl Schema {
    /// The demo collaboration's schema: `bank(customer, email, phone,
    /// category, amount, date)` and `platform(email, phone, segment, country)`.
    pub fn standard(categories: &[String], segments: &[String], countries: &[String]) -> Self {
        Self {
            holder_table: "bank".into(),
            matcher_table: "platform".into(),
            holder: vec![
                ("customer".into(), ColumnKind::Customer),
                ("email".into(), ColumnKind::Identifier),
                ("phone".into(), ColumnKind::Identifier),
                ("category".into(), ColumnKind::Categorical(categories.to_vec())),
                ("amount".into(), ColumnKind::Money),
                ("date".into(), ColumnKind::Date),
            ],
            matcher: vec![
                ("email".into(), ColumnKind::Identifier),
                ("phone".into(), ColumnKind::Identifier),
                ("segment".into(), ColumnKind::Categorical(segments.to_vec())),
                ("country".into(), ColumnKind::Categorical(countries.to_vec())),
            ],
        }
    }

    fn table(&self, side: Side) -> &str {
        match side {
            Side::Holder => &self.holder_table,
            Side::Matcher => &self.matcher_table,
        }
    }

    fn columns(&self, side: Side) -> &[(String, ColumnKind)] {
        match side {
            Side::Holder => &self.holder,
            Side::Matcher => &self.matcher,
        }
    }
}

/// A resolved column.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Column {
    /// Its table's side.
    pub side: Side,
    /// Its name.
    pub name: String,
}

/// An aggregate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Measure {
    /// `COUNT(DISTINCT customer)`.
    CountCustomers,
    /// `COUNT(*)`: holder rows (transactions).
    CountRows,
    /// `SUM(money column)`.
    Sum(String),
    /// `AVG(money column)`: reported as `SUM` and `COUNT(*)` and their ratio.
    Avg(String),
}

/// One selected aggregate, with its output name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Output {
    /// Alias, or a generated name.
    pub name: String,
    /// What it computes.
    pub measure: Measure,
}

/// A literal value after parameter binding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Literal {
    /// A string (category, segment, date text).
    Text(String),
    /// A money amount in cents.
    Cents(i64),
    /// A date, days since 1970-01-01.
    Day(i32),
}

/// A comparison operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cmp {
    /// `=`
    Eq,
    /// `<>`
    Ne,
    /// `<`
    Lt,
    /// `<=`
    Le,
    /// `>`
    Gt,
    /// `>=`
    Ge,
}

/// One conjunct of the WHERE clause.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Predicate {
    /// `column op value`.
    Compare(Column, Cmp, Literal),
    /// `column IN (values)`.
    In(Column, Vec<Literal>),
    /// `column BETWEEN low AND high`.
    Between(Column, Literal, Literal),
}

impl Predicate {
    /// The column it constrains.
    pub fn column(&self) -> &Column {
        match self {
            Predicate::Compare(c, _, _) | Predicate::In(c, _) | Predicate::Between(c, _, _) => c,
        }
    }
}

/// A query in the dialect, checked against the schema, parameters bound.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SqlPlan {
    /// Selected dimensions, in SELECT order.
    pub dimensions: Vec<Column>,
    /// GROUP BY columns, in GROUP BY order.
    pub group_by: Vec<Column>,
    /// Aggregates, in SELECT order.
    pub outputs: Vec<Output>,
    /// WHERE conjuncts.
    pub filters: Vec<Predicate>,
}

impl SqlPlan {
    /// GROUP BY columns of one side.
    pub fn groups(&self, side: Side) -> Vec<&Column> {
        self.group_by.iter().filter(|c| c.side == side).collect()
    }

    /// WHERE conjuncts on one side.
    pub fn filters_on(&self, side: Side) -> Vec<&Predicate> {
        self.filters.iter().filter(|p| p.column().side == side).collect()
    }
}

struct Ctx<'a> {
    schema: &'a Schema,
    aliases: BTreeMap<String, Side>,
    params: &'a BTreeMap<String, String>,
}

fn ident_parts(e: &Expr) -> Option<Vec<String>> {
    match e {
        Expr::Identifier(i) => Some(vec![i.value.to_lowercase()]),
        Expr::CompoundIdentifier(parts) => Some(parts.iter().map(|i| i.value.to_lowercase()).collect()),
        Expr::Nested(inner) => ident_parts(inner),
        _ => None,
    }
}

impl Ctx<'_> {
    fn column(&self, e: &Expr) -> Result<(Column, ColumnKind), SqlError> {
        let Some(parts) = ident_parts(e) else {
            return refuse(format!(
                "`{e}` is an expression; only plain columns of declared type are allowed here"
            ));
        };
        let (side, name) = match parts.as_slice() {
            [table, name] => match self.aliases.get(table) {
                Some(side) => (*side, name.clone()),
                None => {
                    return refuse(format!(
                        "`{e}`: unknown table or alias `{table}` (use {} and {} as named in FROM)",
                        self.schema.holder_table, self.schema.matcher_table
                    ));
                }
            },
            [name] => {
                let h = self.schema.holder.iter().any(|(c, _)| c == name);
                let m = self.schema.matcher.iter().any(|(c, _)| c == name);
                match (h, m) {
                    (true, false) => (Side::Holder, name.clone()),
                    (false, true) => (Side::Matcher, name.clone()),
                    (true, true) => return refuse(format!("`{name}` is ambiguous: qualify it with its table")),
                    (false, false) => return refuse(format!("unknown column `{name}`")),
                }
            }
            _ => return refuse(format!("`{e}`: use `table.column` or `alias.column`")),
        };
        let Some((_, kind)) = self.schema.columns(side).iter().find(|(c, _)| *c == name) else {
            return refuse(format!(
                "unknown column `{e}`: {} has {}",
                self.schema.table(side),
                self.schema
                    .columns(side)
                    .iter()
                    .map(|(c, _)| c.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        };
        Ok((Column { side, name }, kind.clone()))
    }

    /// A column usable as a dimension or filter: not an identifier.
    fn plain_column(&self, e: &Expr, role: &str) -> Result<(Column, ColumnKind), SqlError> {
        let (c, kind) = self.column(e)?;
        if matches!(kind, ColumnKind::Identifier | ColumnKind::Customer) {
            return refuse(format!(
                "identifier column `{}.{}` cannot be {role}: the join on identifiers is implicit and they never leave their node",
                self.schema.table(c.side),
                c.name
            ));
        }
        Ok((c, kind))
    }

    fn literal(&self, e: &Expr, column: &Column, kind: &ColumnKind) -> Result<Literal, SqlError> {
        let text = match e {
            Expr::Value(v) => match &v.value {
                Value::SingleQuotedString(s) => s.clone(),
                Value::Number(n, _) => n.clone(),
                Value::Placeholder(p) => {
                    let name = p.trim_start_matches([':', '$', '@']);
                    match self.params.get(name) {
                        Some(v) => v.clone(),
                        None => return refuse(format!("parameter `:{name}` has no value (pass --param {name}=...)")),
                    }
                }
                other => return refuse(format!("`{other}` is not a value of `{}`", column.name)),
            },
            Expr::UnaryOp { op, expr } if op.to_string() == "-" => match ident_parts(expr) {
                None => format!("-{expr}"),
                Some(_) => return refuse(format!("`{e}` is an expression; compare with a value")),
            },
            other => {
                return refuse(format!(
                    "`{other}` is not a value: compare columns with literals or :parameters"
                ));
            }
        };
        match kind {
            ColumnKind::Categorical(domain) => {
                if !domain.contains(&text) {
                    return refuse(format!(
                        "'{text}' is not a declared value of `{}` (declared: {})",
                        column.name,
                        domain.join(", ")
                    ));
                }
                Ok(Literal::Text(text))
            }
            ColumnKind::Money => crate::parse_cents(&text)
                .map(Literal::Cents)
                .ok_or_else(|| SqlError(format!("'{text}' is not an amount for `{}` (e.g. 12.50)", column.name))),
            ColumnKind::Date => crate::parse_date(&text)
                .map(Literal::Day)
                .map_err(|e| SqlError(format!("`{}`: {e}", column.name))),
            ColumnKind::Identifier | ColumnKind::Customer => refuse("identifiers cannot be compared"),
        }
    }

    fn predicate(&self, e: &Expr, out: &mut Vec<Predicate>) -> Result<(), SqlError> {
        match e {
            Expr::Nested(inner) => self.predicate(inner, out),
            Expr::BinaryOp {
                left,
                op: BinaryOperator::And,
                right,
            } => {
                self.predicate(left, out)?;
                self.predicate(right, out)
            }
            Expr::BinaryOp {
                op: BinaryOperator::Or, ..
            } => refuse(format!(
                "`{e}`: OR is not supported (conditions are joined by AND; use IN for alternatives on one column)"
            )),
            Expr::BinaryOp { left, op, right } => {
                let cmp = match op {
                    BinaryOperator::Eq => Cmp::Eq,
                    BinaryOperator::NotEq => Cmp::Ne,
                    BinaryOperator::Lt => Cmp::Lt,
                    BinaryOperator::LtEq => Cmp::Le,
                    BinaryOperator::Gt => Cmp::Gt,
                    BinaryOperator::GtEq => Cmp::Ge,
                    other => return refuse(format!("`{e}`: operator `{other}` is not supported in WHERE")),
                };
                let (c, kind) = self.plain_column(left, "filtered")?;
                if c.side == Side::Matcher && cmp != Cmp::Eq {
                    return refuse(format!("`{e}`: platform columns accept only = and IN"));
                }
                if ident_parts(right).is_some() {
                    return refuse(format!("`{e}`: compare a column with a value, not with another column"));
                }
                let v = self.literal(right, &c, &kind)?;
                out.push(Predicate::Compare(c, cmp, v));
                Ok(())
            }
            Expr::In {
                expr, target, negated, ..
            } => {
                let InTarget::List(list) = target else {
                    return refuse(format!("`{e}`: IN takes a list of values, not a subquery"));
                };
                if *negated {
                    return refuse(format!("`{e}`: NOT IN is not supported; list the values to keep"));
                }
                let (c, kind) = self.plain_column(expr, "filtered")?;
                if list.is_empty() {
                    return refuse(format!("`{e}`: IN needs at least one value"));
                }
                let vals = list
                    .iter()
                    .map(|v| self.literal(v, &c, &kind))
                    .collect::<Result<Vec<_>, _>>()?;
                out.push(Predicate::In(c, vals));
                Ok(())
            }
            Expr::Between {
                expr,
                negated,
                low,
                high,
            } => {
                if *negated {
                    return refuse(format!("`{e}`: NOT BETWEEN is not supported"));
                }
                let (c, kind) = self.plain_column(expr, "filtered")?;
                if c.side == Side::Matcher {
                    return refuse(format!("`{e}`: platform columns accept only = and IN"));
                }
                let lo = self.literal(low, &c, &kind)?;
                let hi = self.literal(high, &c, &kind)?;
                out.push(Predicate::Between(c, lo, hi));
                Ok(())
            }
            other => refuse(format!(
                "`{other}` is not a supported condition (use comparisons, IN and BETWEEN joined by AND)"
            )),
        }
    }

    fn aggregate(&self, e: &Expr) -> Result<Option<Measure>, SqlError> {
        let Expr::Function(f) = e else {
            return Ok(None);
        };
        let name = f.name.to_string().to_lowercase();
        if f.over.is_some() || f.filter.is_some() || !f.within_group.is_empty() {
            return refuse(format!(
                "`{e}`: window functions, FILTER and WITHIN GROUP are not supported"
            ));
        }
        let FunctionArguments::List(list) = &f.args else {
            return refuse(format!("`{e}` is not a supported aggregate"));
        };
        if !list.clauses.is_empty() {
            return refuse(format!("`{e}`: clauses inside aggregates are not supported"));
        }
        let distinct = matches!(list.duplicate_treatment, Some(DuplicateTreatment::Distinct));
        let arg = match list.args.as_slice() {
            [FunctionArg::Unnamed(a)] => a,
            _ => return refuse(format!("`{e}`: aggregates take exactly one argument")),
        };
        match (name.as_str(), arg) {
            ("count", FunctionArgExpr::Wildcard) if !distinct => Ok(Some(Measure::CountRows)),
            ("count", FunctionArgExpr::Expr(x)) if distinct => {
                let (c, kind) = self.column(x)?;
                if c.side == Side::Holder && kind == ColumnKind::Customer {
                    Ok(Some(Measure::CountCustomers))
                } else {
                    refuse(format!(
                        "`{e}`: COUNT(DISTINCT ...) is supported only for the bank's customer column"
                    ))
                }
            }
            ("count", _) => refuse(format!("`{e}`: use COUNT(*) or COUNT(DISTINCT customer)")),
            ("sum" | "avg", FunctionArgExpr::Expr(x)) if !distinct => {
                let Some(_) = ident_parts(x) else {
                    return refuse(format!("`{e}`: aggregate a plain money column, not an expression"));
                };
                let (c, kind) = self.column(x)?;
                if c.side != Side::Holder || kind != ColumnKind::Money {
                    return refuse(format!("`{e}`: SUM and AVG apply to the bank's money columns only"));
                }
                Ok(Some(if name == "sum" {
                    Measure::Sum(c.name)
                } else {
                    Measure::Avg(c.name)
                }))
            }
            _ => refuse(format!(
                "`{e}` is not a supported aggregate (COUNT(DISTINCT customer), COUNT(*), SUM, AVG)"
            )),
        }
    }
}

/// Parses and checks a query, binding `:name` placeholders from `params`.
///
/// # Errors
/// A [`SqlError`] naming the offending part and what to change.
pub fn parse(sql: &str, schema: &Schema, params: &BTreeMap<String, String>) -> Result<SqlPlan, SqlError> {
    if sql.len() > MAX_SQL_LEN {
        return refuse(format!(
            "the query is {} bytes long; the limit is {MAX_SQL_LEN}",
            sql.len()
        ));
    }
    let statements = Parser::new(&GenericDialect {})
        .with_recursion_limit(32)
        .try_with_sql(sql)
        .and_then(|mut p| p.parse_statements())
        .map_err(|e| SqlError(format!("SQL syntax error: {e}")))?;
    let [statement] = statements.as_slice() else {
        return refuse(format!("send exactly one SELECT statement (got {})", statements.len()));
    };
    let Statement::Query(query) = statement else {
        return refuse("only SELECT queries are accepted");
    };
    if query.with.is_some() {
        return refuse("WITH (common table expressions) is not supported");
    }
    if query.order_by.is_some() {
        return refuse("ORDER BY is not supported: results come back one row per group; sort them yourself");
    }
    if query.limit_clause.is_some() || query.fetch.is_some() {
        return refuse("LIMIT/FETCH is not supported: every group is returned (small ones are suppressed)");
    }
    if !query.locks.is_empty()
        || query.for_clause.is_some()
        || query.settings.is_some()
        || query.format_clause.is_some()
        || !query.pipe_operators.is_empty()
    {
        return refuse("only a plain SELECT ... FROM ... WHERE ... GROUP BY ... is supported");
    }
    let SetExpr::Select(select) = query.body.as_ref() else {
        return refuse("UNION, INTERSECT, VALUES and nested queries are not supported: use one SELECT");
    };
    if select.distinct.is_some() {
        return refuse("SELECT DISTINCT is not supported: results are already one row per group");
    }
    if select.having.is_some() {
        return refuse("HAVING is not supported: the template's minimum noisy count suppresses small cells");
    }
    if select.top.is_some()
        || select.into.is_some()
        || !select.lateral_views.is_empty()
        || select.prewhere.is_some()
        || select.qualify.is_some()
        || !select.named_window.is_empty()
        || !select.cluster_by.is_empty()
        || !select.distribute_by.is_empty()
        || !select.sort_by.is_empty()
        || !select.connect_by.is_empty()
    {
        return refuse("only a plain SELECT ... FROM ... WHERE ... GROUP BY ... is supported");
    }

    // FROM <holder> [alias] JOIN <matcher> [alias], in either order.
    let [from] = select.from.as_slice() else {
        return refuse(format!(
            "FROM must be `{} JOIN {}` (got {} FROM items)",
            schema.holder_table,
            schema.matcher_table,
            select.from.len()
        ));
    };
    let [join] = from.joins.as_slice() else {
        return refuse(format!(
            "FROM must join exactly the two tables: `{} JOIN {}`",
            schema.holder_table, schema.matcher_table
        ));
    };
    match &join.join_operator {
        JoinOperator::Join(c) | JoinOperator::Inner(c) => {
            if !matches!(c, JoinConstraint::None) {
                return refuse(
                    "remove the ON/USING clause: the join is implicit on the collaboration's identifier columns",
                );
            }
        }
        _ => return refuse("only an inner JOIN is supported (the result is over the shared customers)"),
    }
    let mut aliases = BTreeMap::new();
    for rel in [&from.relation, &join.relation] {
        let TableFactor::Table { name, alias, args, .. } = rel else {
            return refuse(format!(
                "`{rel}`: FROM takes the two tables by name, not subqueries or functions"
            ));
        };
        if args.is_some() {
            return refuse(format!("`{rel}`: table functions are not supported"));
        }
        let table = match name.0.as_slice() {
            [ObjectNamePart::Identifier(i)] => i.value.to_lowercase(),
            _ => return refuse(format!("`{name}`: unknown table")),
        };
        let side = if table == schema.holder_table {
            Side::Holder
        } else if table == schema.matcher_table {
            Side::Matcher
        } else {
            return refuse(format!(
                "unknown table `{table}`: the tables are {} and {}",
                schema.holder_table, schema.matcher_table
            ));
        };
        if aliases.values().any(|s| *s == side) {
            return refuse(format!("`{table}` appears twice in FROM"));
        }
        aliases.insert(table, side);
        if let Some(a) = alias {
            if !a.columns.is_empty() {
                return refuse(format!("`{a}`: column aliases in FROM are not supported"));
            }
            aliases.insert(a.name.value.to_lowercase(), side);
        }
    }
    let ctx = Ctx {
        schema,
        aliases,
        params,
    };

    // GROUP BY.
    let group_exprs = match &select.group_by {
        GroupByExpr::Expressions(exprs, modifiers) => {
            if !modifiers.is_empty() {
                return refuse("GROUP BY modifiers (ROLLUP, CUBE, ...) are not supported");
            }
            exprs.clone()
        }
        GroupByExpr::All(_) => return refuse("GROUP BY ALL is not supported: name the columns"),
    };
    let mut group_by = Vec::new();
    for g in &group_exprs {
        let (c, kind) = ctx.plain_column(g, "grouped")?;
        if !matches!(kind, ColumnKind::Categorical(_)) {
            return refuse(format!(
                "GROUP BY `{g}`: only columns with a declared list of values can be grouped"
            ));
        }
        if group_by.contains(&c) {
            return refuse(format!("GROUP BY `{g}` appears twice"));
        }
        group_by.push(c);
    }

    // SELECT.
    let mut dimensions = Vec::new();
    let mut outputs = Vec::new();
    for item in &select.projection {
        let (expr, alias) = match item {
            SelectItem::UnnamedExpr(e) => (e, None),
            SelectItem::ExprWithAlias { expr, alias } => (expr, Some(alias.value.clone())),
            _ => return refuse(format!("`{item}`: select named dimensions and aggregates, not *")),
        };
        if let Some(m) = ctx.aggregate(expr)? {
            let name = alias.unwrap_or_else(|| expr.to_string().to_lowercase());
            if outputs.iter().any(|o: &Output| o.name == name) {
                return refuse(format!("two outputs are named `{name}`: give them different aliases"));
            }
            outputs.push(Output { name, measure: m });
            continue;
        }
        let (c, _) = ctx.plain_column(expr, "selected").map_err(|e| {
            if ident_parts(expr).is_none() {
                SqlError(format!(
                    "`{expr}` is neither a grouped column nor a supported aggregate"
                ))
            } else {
                e
            }
        })?;
        if !group_by.contains(&c) {
            return refuse(format!("`{expr}` is selected but not aggregated: add it to GROUP BY"));
        }
        dimensions.push(c);
    }
    if outputs.is_empty() {
        return refuse("select at least one aggregate (COUNT(DISTINCT customer), COUNT(*), SUM or AVG)");
    }

    // WHERE.
    let mut filters = Vec::new();
    if let Some(w) = &select.selection {
        ctx.predicate(w, &mut filters)?;
    }
    Ok(SqlPlan {
        dimensions,
        group_by,
        outputs,
        filters,
    })
}

fn tokens(sql: &str) -> Option<Vec<sqlparser::tokenizer::Token>> {
    use sqlparser::tokenizer::{Token, Tokenizer};
    let toks = Tokenizer::new(&GenericDialect {}, sql).tokenize().ok()?;
    let toks: Vec<Token> = toks
        .into_iter()
        .filter(|t| !matches!(t, Token::Whitespace(_)))
        .collect();
    // `:name` may come out as a colon and a word: fold it into one placeholder.
    let mut out = Vec::with_capacity(toks.len());
    let mut it = toks.into_iter().peekable();
    while let Some(t) = it.next() {
        if t == Token::Colon
            && let Some(Token::Word(w)) = it.peek()
        {
            let p = Token::Placeholder(format!(":{}", w.value));
            it.next();
            out.push(p);
            continue;
        }
        out.push(t);
    }
    Some(out)
}

/// Whether `query` is an instance of `template`: the same tokens (keywords
/// and names compared case-insensitively), with each `:name` placeholder of
/// the template matched by one literal in the query. Returns the literals as
/// parameters, or `None` when the texts differ otherwise.
pub fn match_instance(template: &str, query: &str) -> Option<Vec<(String, String)>> {
    use sqlparser::tokenizer::Token;
    if query.len() > MAX_SQL_LEN {
        return None;
    }
    let (t, q) = (tokens(template)?, tokens(query)?);
    if t.len() != q.len() {
        return None;
    }
    let mut params: Vec<(String, String)> = Vec::new();
    for (a, b) in t.iter().zip(&q) {
        match (a, b) {
            (Token::Placeholder(p), Token::SingleQuotedString(v)) | (Token::Placeholder(p), Token::Number(v, _)) => {
                let name = p.trim_start_matches([':', '$', '@']).to_string();
                match params.iter().find(|(n, _)| *n == name) {
                    Some((_, old)) if old != v => return None,
                    Some(_) => {}
                    None => params.push((name, v.clone())),
                }
            }
            (Token::Word(x), Token::Word(y)) => {
                if x.value.to_lowercase() != y.value.to_lowercase() {
                    return None;
                }
            }
            (x, y) if x == y => {}
            _ => return None,
        }
    }
    Some(params)
}

/// The `:name` placeholders a query uses, in order of appearance.
pub fn placeholders(sql: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let bytes = sql.as_bytes();
    let mut i = 0;
    let mut in_string = false;
    while let Some(&b) = bytes.get(i) {
        if b == b'\'' {
            in_string = !in_string;
        } else if b == b':' && !in_string {
            let start = i + 1;
            let mut j = start;
            while bytes.get(j).is_some_and(|c| c.is_ascii_alphanumeric() || *c == b'_') {
                j += 1;
            }
            if j > start
                && let Some(name) = sql.get(start..j)
                && !out.iter().any(|n| n == name)
            {
                out.push(name.to_string());
            }
            i = j;
            continue;
        }
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema() -> Schema {
        Schema::standard(
            &["groceries".into(), "fuel".into(), "other".into()],
            &["messenger_active".into(), "gamer".into()],
            &["GB".into(), "FR".into()],
        )
    }

    fn params() -> BTreeMap<String, String> {
        [("start", "2026-01-01"), ("end", "2026-03-31"), ("seg", "gamer")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    const EXAMPLE: &str = "SELECT b.category, COUNT(DISTINCT b.customer) AS customers, SUM(b.amount) AS spend \
        FROM bank b JOIN platform p \
        WHERE b.date BETWEEN :start AND :end AND p.segment IN ('messenger_active') \
        GROUP BY b.category, p.country";

    #[test]
    fn the_product_example_parses() {
        let plan = parse(EXAMPLE, &schema(), &params()).unwrap();
        assert_eq!(plan.dimensions.len(), 1);
        assert_eq!(plan.group_by.len(), 2);
        assert_eq!(plan.groups(Side::Matcher).len(), 1);
        assert_eq!(plan.outputs.len(), 2);
        assert_eq!(plan.outputs[0].measure, Measure::CountCustomers);
        assert_eq!(plan.outputs[1].measure, Measure::Sum("amount".into()));
        assert_eq!(plan.filters.len(), 2);
        assert_eq!(placeholders(EXAMPLE), vec!["start".to_string(), "end".to_string()]);
    }

    /// Queries the dialect must refuse, each with a word of the expected message.
    const REFUSED: &[(&str, &str)] = &[
        ("DELETE FROM bank", "only SELECT"),
        (
            "SELECT COUNT(*) FROM bank b JOIN platform p; SELECT COUNT(*) FROM bank b JOIN platform p",
            "exactly one",
        ),
        ("SELEC COUNT(*) FROM bank", "syntax error"),
        (
            "WITH x AS (SELECT 1) SELECT COUNT(*) FROM bank b JOIN platform p",
            "WITH",
        ),
        ("SELECT COUNT(*) FROM bank b JOIN platform p ORDER BY 1", "ORDER BY"),
        ("SELECT COUNT(*) FROM bank b JOIN platform p LIMIT 5", "LIMIT"),
        (
            "SELECT b.category, COUNT(*) FROM bank b JOIN platform p GROUP BY b.category HAVING COUNT(*) > 5",
            "HAVING",
        ),
        (
            "SELECT DISTINCT b.category FROM bank b JOIN platform p GROUP BY b.category",
            "DISTINCT",
        ),
        ("SELECT COUNT(*) FROM bank", "JOIN"),
        ("SELECT COUNT(*) FROM bank b JOIN users u", "unknown table"),
        (
            "SELECT COUNT(*) FROM bank b JOIN platform p ON b.email = p.email",
            "ON/USING",
        ),
        ("SELECT COUNT(*) FROM bank b LEFT JOIN platform p", "inner JOIN"),
        (
            "SELECT COUNT(*) FROM bank b JOIN (SELECT * FROM platform) p",
            "not subqueries",
        ),
        ("SELECT * FROM bank b JOIN platform p", "not *"),
        (
            "SELECT b.email, COUNT(*) FROM bank b JOIN platform p GROUP BY b.email",
            "identifier column",
        ),
        (
            "SELECT COUNT(*) FROM bank b JOIN platform p WHERE p.email = 'a@b.com'",
            "identifier column",
        ),
        (
            "SELECT b.customer, COUNT(*) FROM bank b JOIN platform p GROUP BY b.customer",
            "identifier column",
        ),
        (
            "SELECT COUNT(*) FROM bank b JOIN platform p WHERE b.merchant = 'x'",
            "unknown column",
        ),
        (
            "SELECT b.category, COUNT(*) FROM bank b JOIN platform p",
            "add it to GROUP BY",
        ),
        (
            "SELECT COUNT(*) FROM bank b JOIN platform p WHERE b.category = 'fuel' OR p.segment = 'gamer'",
            "OR is not supported",
        ),
        (
            "SELECT SUM(b.amount * 2) FROM bank b JOIN platform p",
            "not an expression",
        ),
        (
            "SELECT b.amount + 1 FROM bank b JOIN platform p",
            "neither a grouped column",
        ),
        (
            "SELECT MAX(b.amount) FROM bank b JOIN platform p",
            "not a supported aggregate",
        ),
        (
            "SELECT COUNT(DISTINCT b.category) FROM bank b JOIN platform p",
            "customer column",
        ),
        ("SELECT COUNT(b.amount) FROM bank b JOIN platform p", "COUNT(*)"),
        ("SELECT SUM(p.country) FROM bank b JOIN platform p", "money columns"),
        (
            "SELECT COUNT(*) FROM bank b JOIN platform p WHERE p.segment <> 'gamer'",
            "only = and IN",
        ),
        (
            "SELECT COUNT(*) FROM bank b JOIN platform p WHERE p.segment = 'pensioner'",
            "not a declared value",
        ),
        (
            "SELECT COUNT(*) FROM bank b JOIN platform p WHERE b.date > '2026-02-30'",
            "YYYY-MM-DD",
        ),
        (
            "SELECT COUNT(*) FROM bank b JOIN platform p WHERE b.date > :missing",
            "has no value",
        ),
        (
            "SELECT COUNT(*) FROM bank b JOIN platform p WHERE b.category NOT IN ('fuel')",
            "NOT IN",
        ),
        (
            "SELECT COUNT(*) FROM bank b JOIN platform p WHERE email = 'x'",
            "ambiguous",
        ),
        (
            "SELECT COUNT(*) FROM bank b JOIN platform p WHERE x.category = 'fuel'",
            "unknown table or alias",
        ),
        (
            "SELECT b.amount, COUNT(*) FROM bank b JOIN platform p GROUP BY b.amount",
            "declared list of values",
        ),
        (
            "SELECT b.category FROM bank b JOIN platform p GROUP BY b.category",
            "at least one aggregate",
        ),
        (
            "SELECT COUNT(*) FROM bank b JOIN platform p WHERE b.amount > b.amount",
            "not with another column",
        ),
        (
            "SELECT COUNT(*) FROM bank b JOIN platform p WHERE p.country BETWEEN 'FR' AND 'GB'",
            "only = and IN",
        ),
        (
            "SELECT COUNT(*) FROM bank b JOIN platform p WHERE b.amount > 'lots'",
            "not an amount",
        ),
        (
            "SELECT COUNT(*) AS n, SUM(b.amount) AS n FROM bank b JOIN platform p",
            "different aliases",
        ),
        (
            "SELECT COUNT(*) FROM bank b JOIN platform p WHERE LOWER(b.category) = 'fuel'",
            "expression",
        ),
        (
            "SELECT COUNT(*) FROM bank b JOIN platform p JOIN bank c",
            "exactly the two tables",
        ),
        ("SELECT COUNT(*) FROM bank b, platform p", "FROM must be"),
        (
            "SELECT COUNT(*) FROM bank b JOIN platform p GROUP BY ROLLUP (b.category)",
            "only plain columns",
        ),
    ];

    /// Queries the dialect must accept.
    const ACCEPTED: &[&str] = &[
        EXAMPLE,
        "SELECT COUNT(DISTINCT b.customer) FROM bank b JOIN platform p",
        "SELECT COUNT(*) FROM bank JOIN platform",
        "SELECT COUNT(DISTINCT customer) AS shared FROM platform p JOIN bank b",
        "SELECT b.category, SUM(b.amount) FROM bank b INNER JOIN platform p GROUP BY b.category",
        "SELECT p.country, COUNT(DISTINCT b.customer) FROM bank b JOIN platform p GROUP BY p.country",
        "SELECT b.category, p.segment, AVG(b.amount) AS avg_spend FROM bank b JOIN platform p GROUP BY b.category, p.segment",
        "SELECT category, COUNT(*) FROM bank b JOIN platform p WHERE segment = 'gamer' GROUP BY category",
        "SELECT COUNT(*) FROM bank b JOIN platform p WHERE b.amount >= 10.50 AND b.amount < 100",
        "SELECT COUNT(*) FROM bank b JOIN platform p WHERE b.date = '2026-01-05'",
        "SELECT COUNT(*) FROM bank b JOIN platform p WHERE b.category IN ('fuel', 'groceries') AND p.country IN ('GB')",
        "SELECT COUNT(*) FROM bank b JOIN platform p WHERE (b.date BETWEEN :start AND :end) AND p.segment = :seg",
        "SELECT COUNT(*) FROM bank b JOIN platform p WHERE b.category <> 'other'",
        "SELECT b.category, COUNT(DISTINCT b.customer), COUNT(*), SUM(b.amount), AVG(b.amount) FROM bank b JOIN platform p GROUP BY b.category",
        "select b.category, count(*) from BANK b join PLATFORM p group by b.category",
        "SELECT SUM(b.amount) FROM bank b JOIN platform p WHERE b.amount > -5",
        "SELECT p.segment, p.country, COUNT(*) FROM bank b JOIN platform p GROUP BY p.segment, p.country",
    ];

    #[test]
    fn refused_queries_say_what_is_wrong() {
        assert!(REFUSED.len() >= 25);
        for (sql, needle) in REFUSED {
            match parse(sql, &schema(), &params()) {
                Ok(p) => panic!("accepted: {sql}\n{p:?}"),
                Err(SqlError(m)) => assert!(m.contains(needle), "{sql}\n  message: {m}\n  expected: {needle}"),
            }
        }
    }

    #[test]
    fn accepted_queries_parse() {
        assert!(ACCEPTED.len() >= 15);
        for sql in ACCEPTED {
            if let Err(e) = parse(sql, &schema(), &params()) {
                panic!("refused: {sql}\n  {e}");
            }
        }
    }

    #[test]
    fn instances_of_a_template() {
        let t = "SELECT b.category, COUNT(*) FROM bank b JOIN platform p WHERE b.date BETWEEN :start AND :end AND p.segment = :seg GROUP BY b.category";
        let q = "select b.category, count(*)  from BANK b join platform p\n where b.date between '2026-01-01' and '2026-02-01' and p.segment = 'gamer' group by b.category";
        assert_eq!(
            match_instance(t, q),
            Some(vec![
                ("start".to_string(), "2026-01-01".to_string()),
                ("end".to_string(), "2026-02-01".to_string()),
                ("seg".to_string(), "gamer".to_string())
            ])
        );
        // A different query, a column instead of a literal, an extra condition.
        assert_eq!(match_instance(t, &q.replace("b.category,", "p.country,")), None);
        assert_eq!(match_instance(t, &q.replace("'gamer'", "p.country")), None);
        assert_eq!(
            match_instance(t, &q.replace("group by", "and b.amount > 1 group by")),
            None
        );
        // The same placeholder twice must get the same value.
        assert_eq!(match_instance("SELECT :a, :a", "SELECT 1, 2"), None);
        assert_eq!(
            match_instance("SELECT :a, :a", "SELECT 1, 1"),
            Some(vec![("a".to_string(), "1".to_string())])
        );
    }

    #[test]
    fn hostile_inputs_are_refused_cleanly() {
        let deep = format!(
            "SELECT COUNT(*) FROM bank b JOIN platform p WHERE {}b.amount > 1{}",
            "(".repeat(500),
            ")".repeat(500)
        );
        assert!(parse(&deep, &schema(), &params()).is_err());
        assert!(
            parse(&"x".repeat(MAX_SQL_LEN + 1), &schema(), &params())
                .unwrap_err()
                .0
                .contains("limit")
        );
        assert!(parse("", &schema(), &params()).is_err());
        assert!(
            parse(
                "SELECT COUNT(*) FROM bank b JOIN platform p WHERE b.category = 'fuel\u{0}'",
                &schema(),
                &params()
            )
            .is_err()
        );
    }
}
