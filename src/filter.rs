//! Message filters in CEL (DESIGN §4).
//!
//! A filter is compiled once, before any message is touched, so a typo is
//! reported with its position and no queue is disturbed. Evaluation errors on
//! one message (a missing attribute, a type mismatch) count as "no match" and
//! are reported to the caller; they never abort a run.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use cel::common::ast::{CallExpr, EntryExpr, Expr, IdedExpr, LiteralValue, MapExpr, StructExpr};
use cel::common::types::{
    CelBool, CelBytes, CelDouble, CelDuration, CelInt, CelMap, CelMapKey, CelNull, CelString, CelTimestamp,
};
use cel::common::value::Val;
use cel::{Context, Env, ExecutionError, Program, Value};
use chrono::{DateTime, Utc};

use crate::model::{AttrValue, Attribute, DlqMessage};

/// The variables a filter may use, in the order the docs list them.
pub const VARIABLES: &[&str] = &[
    "id",
    "body",
    "json",
    "attributes",
    "reason",
    "description",
    "delivery_count",
    "enqueued_at",
    "age",
    "source",
];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FilterError {
    /// The expression does not parse. `line` and `column` are 1-based.
    #[error("invalid filter at {line}:{column}: {message}{}", quote(source_line, *column))]
    Syntax {
        line: usize,
        column: usize,
        message: String,
        source_line: String,
    },
    /// `line` and `column` (1-based) are those of its first use.
    #[error("invalid filter at {line}:{column}: unknown variable `{name}` (the variables are: {known}){}", quote(source_line, *column), known = VARIABLES.join(", "))]
    UnknownVariable {
        name: String,
        line: usize,
        column: usize,
        source_line: String,
    },
    /// A call to a function that neither CEL's standard library nor its
    /// strings extension declares. `line` and `column` are 1-based.
    #[error("invalid filter at {line}:{column}: unknown function `{name}` (function names are case-sensitive: `startsWith`, `lowerAscii`){}", quote(source_line, *column))]
    UnknownFunction {
        name: String,
        line: usize,
        column: usize,
        source_line: String,
    },
    /// A literal argument that the function refuses whatever the message:
    /// `duration("7d")`, `timestamp("2026-01-01")`, `matches("(")`.
    #[error("invalid filter at {line}:{column}: {function}(): {message}{}", quote(source_line, *column))]
    BadArgument {
        function: String,
        message: String,
        line: usize,
        column: usize,
        source_line: String,
    },
    /// A variable compared with a literal of a type it never compares with:
    /// `delivery_count > "3"`, `enqueued_at > "2026-01-01T00:00:00Z"`.
    #[error("invalid filter at {line}:{column}: {message}{}", quote(source_line, *column))]
    TypeMismatch {
        message: String,
        line: usize,
        column: usize,
        source_line: String,
    },
    /// Too long or too deeply nested to parse and evaluate safely.
    #[error("invalid filter: {0}")]
    TooComplex(String),
}

/// Limits that keep the CEL parser and evaluator, which recurse once per
/// nesting level, inside a 2 MiB tokio worker stack (the API compiles filters
/// there). A fuzzer found expressions ~380 levels deep that overflow even a
/// 16 MiB stack; real DLQ filters are a few lines.
const MAX_FILTER_BYTES: usize = 16 * 1024;
const MAX_FILTER_OPERATORS: usize = 200;
const MAX_FILTER_NESTING: usize = 32;
/// Evaluation cannot be interrupted: `[0,…,9].exists(a, [0,…,9].exists(b,
/// …))` nine deep runs for hours per message and holds off Ctrl-C.
const MAX_COMPREHENSION_NESTING: usize = 3;

/// Nesting depth outside string literals: open brackets, runs of unary
/// operators (`!!!x`, `- - x`) and chains of member selections (`a.b.c`),
/// which all nest in the parse tree the same way. Returns the depth and the
/// 1-based line and column where it is deepest.
#[cfg(test)]
fn nesting(source: &str) -> (usize, usize, usize) {
    complexity(source).deepest
}

/// What [`Filter::compile`] checks before it hands a source to the parser.
struct Complexity {
    /// [`nesting`]'s depth, line and column.
    deepest: (usize, usize, usize),
    /// Binary operators: a chain `a + b + c …` is as deep in the tree as it
    /// is long.
    operators: usize,
    /// The deepest nesting of comprehension macros (`exists`, `all`, ...),
    /// with its line and column: each level multiplies the work per message
    /// by the length of its list.
    comprehensions: (usize, usize, usize),
}

/// The macros that loop over a list or map (the CEL crate takes `existsOne`
/// for `exists_one` too).
const COMPREHENSIONS: [&str; 6] = ["all", "exists", "exists_one", "existsOne", "map", "filter"];

/// A small lexer, enough to skip CEL's string literals (quoted with `"` or
/// `'`, or tripled; raw with an `r` prefix, where a backslash escapes
/// nothing) and comments (`//` to the end of the line), and to see
/// brackets, operators and member selections (`a.b`, `a . b`).
fn complexity(source: &str) -> Complexity {
    let chars: Vec<char> = source.chars().collect();
    let mut out = Complexity {
        deepest: (0, 1, 1),
        operators: 0,
        comprehensions: (0, 1, 1),
    };
    let (mut depth, mut unary, mut chain) = (0usize, 0usize, 0usize);
    // Per open bracket: the member chain it interrupted, whether it opens a
    // comprehension's arguments, and whether it is an index (`a[0]`), which
    // continues the chain.
    let mut open: Vec<(usize, bool, bool)> = Vec::new();
    let mut looping = 0usize;
    let (mut line, mut column) = (1, 0);
    let mut prev_operand = false;
    // The identifier being read (a string's prefix, a macro's name), and
    // whether a member selection's `.` came right before it.
    let mut word = String::new();
    let mut selected = false;
    // The name a `(` would call, and whether it was selected (`x.exists`):
    // kept across spaces (`x.exists (v, …)`), unlike a string's prefix.
    let mut callee: Option<(String, bool)> = None;
    let mut after_dot = false;
    let mut i = 0;
    let step = |i: &mut usize, line: &mut usize, column: &mut usize| {
        *column += 1;
        if chars[*i] == '\n' {
            *line += 1;
            *column = 0;
        }
        *i += 1;
    };
    while i < chars.len() {
        let c = chars[i];
        step(&mut i, &mut line, &mut column);
        // A comment, to the end of its line: a quote in it opens no string.
        if c == '/' && chars.get(i) == Some(&'/') {
            while i < chars.len() && chars[i] != '\n' {
                step(&mut i, &mut line, &mut column);
            }
            continue;
        }
        if c == '"' || c == '\'' {
            let raw = word.len() <= 2
                && word.chars().any(|p| p == 'r' || p == 'R')
                && word.chars().all(|p| "rRbB".contains(p));
            let triple = chars.get(i) == Some(&c) && chars.get(i + 1) == Some(&c);
            if triple {
                step(&mut i, &mut line, &mut column);
                step(&mut i, &mut line, &mut column);
            }
            while i < chars.len() {
                let d = chars[i];
                step(&mut i, &mut line, &mut column);
                if d == '\\' && !raw {
                    if i < chars.len() {
                        step(&mut i, &mut line, &mut column);
                    }
                } else if d == c && !triple {
                    break;
                } else if d == c && chars.get(i) == Some(&c) && chars.get(i + 1) == Some(&c) {
                    step(&mut i, &mut line, &mut column);
                    step(&mut i, &mut line, &mut column);
                    break;
                }
            }
            word.clear();
            prev_operand = true;
            continue;
        }
        if c.is_alphanumeric() || c == '_' {
            if word.is_empty() {
                selected = after_dot;
            }
            word.push(c);
            after_dot = false;
            prev_operand = true;
            unary = 0;
        } else {
            let name = std::mem::take(&mut word);
            if !name.is_empty() {
                callee = Some((name, selected));
            }
            // A space after the dot still selects (`a . b`).
            let was_after_dot = if c.is_whitespace() {
                after_dot
            } else {
                std::mem::take(&mut after_dot)
            };
            match c {
                '(' | '[' | '{' => {
                    let (name, selected) = callee.take().unwrap_or_default();
                    let comprehension = c == '(' && selected && COMPREHENSIONS.contains(&name.as_str());
                    let index = c == '[' && prev_operand && name != "in";
                    open.push((chain, comprehension, index));
                    if comprehension {
                        looping += 1;
                        if looping > out.comprehensions.0 {
                            out.comprehensions = (looping, line, column);
                        }
                    }
                    depth += 1;
                    unary = 0;
                    chain = 0;
                    prev_operand = false;
                }
                ')' | ']' | '}' => {
                    depth = depth.saturating_sub(1);
                    if let Some((outer, comprehension, index)) = open.pop() {
                        chain = outer + usize::from(index);
                        looping -= usize::from(comprehension);
                    }
                    prev_operand = true;
                }
                // A member selection (not a number's decimal point), spaces
                // around the dot or not (`a . b` parses as `a.b`).
                '.' if prev_operand
                    && chars[i..]
                        .iter()
                        .find(|n| !n.is_whitespace())
                        .is_some_and(|n| n.is_alphabetic() || *n == '_') =>
                {
                    chain += 1;
                    after_dot = true;
                    prev_operand = false;
                }
                '.' if was_after_dot => {}
                '!' | '-' if !prev_operand => unary += 1,
                c if c.is_whitespace() => {}
                c => {
                    if prev_operand && "+-*/%<>=!&|?:".contains(c) {
                        out.operators += 1;
                    }
                    if c != '.' {
                        chain = 0;
                    }
                    prev_operand = c == '.';
                    unary = 0;
                }
            }
            if !c.is_whitespace() {
                callee = None;
            }
        }
        if depth + unary + chain > out.deepest.0 {
            out.deepest = (depth + unary + chain, line, column);
        }
    }
    out
}

/// A compiled filter, shareable across tasks.
#[derive(Clone)]
pub struct Filter {
    source: Arc<str>,
    program: Arc<Program>,
    env: Arc<Env>,
    /// Which of [`VARIABLES`] the expression references, found once at
    /// compile time: only those are bound per message (binding `body` alone
    /// copies the whole body; bench/run.sh measured the cost).
    uses: Arc<[bool]>,
    /// The attribute keys the expression reads, when it reads `attributes`
    /// only by constant key (see [`attribute_keys`]): only those are bound.
    attribute_keys: Option<Arc<[String]>>,
    /// The literal patterns of its `matches` calls, compiled once (see
    /// [`regex_matches`]).
    patterns: Arc<HashMap<String, regex::Regex>>,
}

impl std::fmt::Debug for Filter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Filter").field(&self.source).finish()
    }
}

impl Filter {
    pub fn compile(source: &str) -> Result<Self, FilterError> {
        if source.len() > MAX_FILTER_BYTES {
            return Err(FilterError::TooComplex(format!(
                "{} bytes long; the limit is {MAX_FILTER_BYTES}",
                source.len()
            )));
        }
        let Complexity {
            deepest: (depth, line, column),
            operators,
            comprehensions,
        } = complexity(source);
        if operators > MAX_FILTER_OPERATORS {
            return Err(FilterError::TooComplex(format!(
                "{operators} operators; the limit is {MAX_FILTER_OPERATORS}"
            )));
        }
        if depth > MAX_FILTER_NESTING {
            return Err(FilterError::TooComplex(format!(
                "nested {depth} levels deep at {line}:{column}; the limit is {MAX_FILTER_NESTING}"
            )));
        }
        if comprehensions.0 > MAX_COMPREHENSION_NESTING {
            return Err(FilterError::TooComplex(format!(
                "comprehensions (all, exists, exists_one, map, filter) nested {} deep at {}:{}; the limit is \
                 {MAX_COMPREHENSION_NESTING} (each level multiplies the work per message by its list's length)",
                comprehensions.0, comprehensions.1, comprehensions.2
            )));
        }
        let env = Arc::new(filter_env());
        let program = env.compile(source).map_err(|errs| {
            // After a syntax error the parser's AST builder reports what it
            // could not build, at 1:1 and in its own terms ("Incomplete
            // `ExprContext` for `_?_:_` expression!"): the syntax error is
            // the one that says what is wrong, and where.
            let mut errors = errs.errors;
            let syntax = errors.iter().position(|e| e.msg.starts_with("Syntax error"));
            let first = match syntax {
                Some(i) => Some(errors.swap_remove(i)),
                None => errors.into_iter().next(),
            };
            let (line, column, mut message) = match first {
                // Both of the parser's sources of positions (ANTLR's
                // syntax errors, its own AST errors) give 1-based columns.
                Some(e) => (e.pos.0.max(1) as usize, e.pos.1.max(1) as usize, e.msg),
                None => (1, 1, "cannot parse".into()),
            };
            // The parser's words for the slips people make most, coming from
            // SQL or Python.
            if message.contains("token recognition error at: '=") {
                message.push_str(" (CEL compares with `==`)");
            } else if ["'and'", "'or'", "'not'"]
                .iter()
                .any(|w| message.contains(&format!("input {w}")))
            {
                message.push_str(" (CEL writes `&&`, `||` and `!`)");
            }
            let source_line = line_of(source, line);
            // ANTLR's syntax errors count characters; the AST builder's
            // (a macro's, such as `has()` of something not a field) count
            // bytes.
            let column = if syntax.is_some() {
                column
            } else {
                source_line.char_indices().take_while(|(i, _)| *i + 1 < column).count() + 1
            };
            FilterError::Syntax {
                line,
                column: column.min(source_line.chars().count() + 1),
                message,
                source_line,
            }
        })?;
        let mut vars = BTreeMap::new();
        let mut calls = Vec::new();
        free_variables(&env, program.expression(), &mut Vec::new(), &mut vars, &mut calls);
        let offset = |id: u64| program.source_info().offset_for(id).map(|(start, _)| start as usize);
        // The walk meets `a.f().g()`'s g before f: the error to report is the
        // first in the text.
        calls.sort_by_key(|(id, _)| offset(*id));
        // Type names (`type(x) == string`) are identifiers too. The first
        // unknown in the text is the one to report.
        if let Some((name, at)) = vars
            .iter()
            .filter(|(v, _)| !VARIABLES.contains(v) && env.types().find_type(v).is_none())
            .map(|(v, ids)| (v, ids.iter().filter_map(|id| offset(*id)).min().unwrap_or(0)))
            .min_by_key(|(_, at)| *at)
        {
            let (line, column) = position(source, at);
            // `math.abs(x)` reads as a call of `abs` on a variable `math`.
            // When no type has that function either, the name was meant as
            // a namespace whose functions are not loaded: say which function.
            let namespaced = calls.iter().find(|(_, c)| {
                matches!(c.target.as_deref(), Some(IdedExpr { expr: Expr::Ident(t), .. }) if t == name)
                    && is_unknown_function(&env, c)
            });
            if let Some((_, call)) = namespaced {
                return Err(FilterError::UnknownFunction {
                    name: format!("{name}.{}", call.func_name),
                    line,
                    column,
                    source_line: line_of(source, line),
                });
            }
            return Err(FilterError::UnknownVariable {
                name: name.to_string(),
                line,
                column,
                source_line: line_of(source, line),
            });
        }
        // The interpreter resolves a function name only when it reaches the
        // call, so a misspelt one (`startswith`) compiled and then failed on
        // every message: no match anywhere, and only a count to show for it.
        if let Some((id, call)) = calls.iter().find(|(_, c)| is_unknown_function(&env, c)) {
            let (line, column) = offset(*id).map_or((1, 1), |at| call_position(source, at, &call.func_name));
            return Err(FilterError::UnknownFunction {
                name: call.func_name.clone(),
                line,
                column,
                source_line: line_of(source, line),
            });
        }
        // Equally, a literal these functions refuse failed on every message,
        // as a cryptic per-message count ("Parsing Error: Error { input:
        // \"d\" ... }" for the `7d` that --older-than accepts).
        if let Some((id, call, message)) = calls
            .iter()
            .find_map(|(id, c)| bad_literal_argument(&env, c).map(|m| (id, c, m)))
        {
            let (line, column) = offset(*id).map_or((1, 1), |at| call_position(source, at, &call.func_name));
            return Err(FilterError::BadArgument {
                function: call.func_name.clone(),
                message,
                line,
                column,
                source_line: line_of(source, line),
            });
        }
        // A comparison of a message variable with a literal of another type
        // fails on every message (`<`), or never holds (`==`), quietly.
        let free = |name: &str, id: u64| vars.get(name).is_some_and(|ids| ids.contains(&id));
        if let Some((at, message)) = calls.iter().find_map(|(_, c)| type_mismatch(c, free)) {
            let (line, column) = offset(at).map_or((1, 1), |at| position(source, at));
            return Err(FilterError::TypeMismatch {
                message,
                line,
                column,
                source_line: line_of(source, line),
            });
        }
        // A filter whose value is never true or false (`reason`, `1`,
        // `delivery_count + 1`) compiled, and then a redrive leased the whole
        // DLQ (raising every delivery count) to fail on each message.
        let top = program.expression();
        if let Some(what) = never_bool(top, |name| vars.get(name).is_some_and(|ids| ids.contains(&top.id))) {
            let (line, column) = offset(top.id).map_or((1, 1), |at| position(source, at));
            return Err(FilterError::TypeMismatch {
                message: format!(
                    "a filter must be true or false, and this is {what}: compare it (`reason == \"Timeout\"`, `delivery_count > 3`)"
                ),
                line,
                column,
                source_line: line_of(source, line),
            });
        }
        let uses = VARIABLES.iter().map(|v| vars.contains_key(v)).collect();
        let attribute_keys = attribute_keys(program.expression()).map(Arc::from);
        // A literal that does not compile was refused above.
        let patterns = calls
            .iter()
            .filter_map(|(_, c)| literal_pattern(c))
            .filter_map(|p| Some((p.to_string(), regex::Regex::new(p).ok()?)))
            .collect();
        Ok(Self {
            source: source.into(),
            program: Arc::new(program),
            env,
            uses,
            attribute_keys,
            patterns: Arc::new(patterns),
        })
    }

    /// A filter that matches every message, used when none is given.
    pub fn match_all() -> Self {
        Self::compile("true").expect("`true` compiles")
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Evaluate against one message. `Err` carries a message for the report.
    pub fn matches(&self, msg: &DlqMessage, now: DateTime<Utc>) -> Result<bool, String> {
        self.evaluate(msg, now)
    }

    /// The reference evaluation [`Filter::matches`] must agree with: every
    /// variable bound, whether the expression references it or not, and
    /// each built as a [`cel::Value`], the crate's plain route, which copies
    /// the message. The fuzz target `filter` checks the two agree.
    #[doc(hidden)]
    pub fn matches_reference(&self, msg: &DlqMessage, now: DateTime<Utc>) -> Result<bool, String> {
        let mut ctx = Context::with_env(self.env.clone());
        bind_message_by_value(&mut ctx, msg, now);
        self.run(&ctx)
    }

    fn evaluate(&self, msg: &DlqMessage, now: DateTime<Utc>) -> Result<bool, String> {
        let mut ctx = Context::with_env(self.env.clone());
        let uses = |name: &str| VARIABLES.iter().position(|v| *v == name).is_some_and(|i| self.uses[i]);
        bind_message(&mut ctx, msg, now, uses, self.attribute_keys.as_deref());
        self.run(&ctx)
    }

    fn run(&self, ctx: &Context<'_, '_>) -> Result<bool, String> {
        let _patterns = PatternsInUse::set(&self.patterns);
        match self.program.execute(ctx) {
            Ok(Value::Bool(b)) => Ok(b),
            Ok(other) => Err(format!("filter must yield a bool, got {:?}", other.type_of())),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// The 1-based line and column of the call at byte `paren`, which is where
/// the parser places a call: at its `(`. The name before it is what a reader
/// looks for, so that is where the position points.
fn call_position(source: &str, paren: usize, name: &str) -> (usize, usize) {
    let before = source.get(..paren).unwrap_or(source);
    let before = before.trim_end().strip_suffix(name).unwrap_or(before);
    position(source, before.len())
}

/// The 1-based line and column (in characters) of byte `at`, as the parser
/// gives node offsets.
fn position(source: &str, at: usize) -> (usize, usize) {
    let before = source.get(..at).unwrap_or(source);
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (
        before.matches('\n').count() + 1,
        before[line_start..].chars().count() + 1,
    )
}

/// Line `line` (1-based) of `source`, to quote in an error; empty past the end.
fn line_of(source: &str, line: usize) -> String {
    source.lines().nth(line.saturating_sub(1)).unwrap_or("").to_string()
}

/// The quoted line with a caret under `column` (1-based, in characters).
/// The caret line repeats the line's tabs and counts wide characters (CJK,
/// emoji) as the two cells a terminal gives them, so it stays under its mark.
fn quote(source_line: &str, column: usize) -> String {
    let pad: String = source_line
        .chars()
        .take(column.saturating_sub(1))
        .map(|c| match c {
            '\t' => "\t".to_string(),
            c => " ".repeat(unicode_width::UnicodeWidthChar::width(c).unwrap_or(0)),
        })
        .collect();
    format!("\n  {source_line}\n  {pad}^")
}

/// Whether the interpreter would find no function for `call`, asked the way it
/// asks at run time: the same call shape, on an empty context, fails with an
/// undeclared reference to the function's name. Operators (`_==_`, `@in`)
/// are the parser's own and always declared.
fn is_unknown_function(env: &Arc<Env>, call: &CallExpr) -> bool {
    let name = &call.func_name;
    if !name.chars().all(|c| c.is_alphanumeric() || c == '_') {
        return false;
    }
    let probe = match call.target {
        Some(_) => format!("''.{name}()"),
        None => format!("{name}()"),
    };
    undeclared(env, &probe).is_some_and(|n| n == *name)
}

/// What the whole filter is, when that is never a bool: a literal of
/// another type, a message variable of another type (`json` may hold a
/// bool, and `free` tells a message variable from a macro's), a list or
/// map, or arithmetic.
fn never_bool(top: &IdedExpr, free: impl Fn(&str) -> bool) -> Option<&'static str> {
    use cel::common::ast::operators::*;
    match &top.expr {
        Expr::Literal(LiteralValue::Boolean(_)) => None,
        Expr::Literal(LiteralValue::Null) => Some("null"),
        Expr::Literal(LiteralValue::String(_)) => Some("a string"),
        Expr::Literal(LiteralValue::Bytes(_)) => Some("bytes"),
        Expr::Literal(_) => Some("a number"),
        Expr::Ident(name) if free(name) => match name.as_str() {
            "id" | "body" | "reason" | "description" | "source" => Some("a string"),
            "delivery_count" => Some("an int"),
            "enqueued_at" => Some("a timestamp"),
            "age" => Some("a duration"),
            "attributes" => Some("a map"),
            _ => None,
        },
        Expr::List(_) => Some("a list"),
        Expr::Map(_) => Some("a map"),
        Expr::Call(c) if [ADD, SUBSTRACT, MULTIPLY, DIVIDE, MODULO, NEGATE].contains(&c.func_name.as_str()) => {
            Some("arithmetic")
        }
        _ => None,
    }
}

/// When `call` compares a message variable whose type is fixed with a
/// literal of a type that never compares with it: the literal's node id and
/// what to write instead. `free` tells a message variable from a macro's
/// variable of the same name.
fn type_mismatch(call: &CallExpr, free: impl Fn(&str, u64) -> bool) -> Option<(u64, String)> {
    use cel::common::ast::operators::*;
    let equality = [EQUALS, NOT_EQUALS].contains(&call.func_name.as_str());
    if !equality && ![LESS, LESS_EQUALS, GREATER, GREATER_EQUALS].contains(&call.func_name.as_str()) {
        return None;
    }
    let [a, b] = call.args.as_slice() else { return None };
    let (name, literal, lit_id) = match (&a.expr, &b.expr) {
        (Expr::Ident(n), Expr::Literal(l)) if free(n, a.id) => (n, l, b.id),
        (Expr::Literal(l), Expr::Ident(n)) if free(n, b.id) => (n, l, a.id),
        _ => return None,
    };
    let (kind, fits) = match name.as_str() {
        "delivery_count" => (
            "an int",
            matches!(
                literal,
                LiteralValue::Int(_) | LiteralValue::UInt(_) | LiteralValue::Double(_)
            ),
        ),
        "id" | "body" | "reason" | "description" | "source" => ("a string", matches!(literal, LiteralValue::String(_))),
        "enqueued_at" => ("a timestamp", false),
        "age" => ("a duration", false),
        _ => return None,
    };
    if fits || (equality && matches!(literal, LiteralValue::Null)) {
        return None;
    }
    let given = match literal {
        LiteralValue::Boolean(_) => "a bool",
        LiteralValue::Bytes(_) => "bytes",
        LiteralValue::Double(_) => "a double",
        LiteralValue::Int(_) => "an int",
        LiteralValue::Null => "null",
        LiteralValue::String(_) => "a string",
        LiteralValue::UInt(_) => "a uint",
    };
    let text = match literal {
        LiteralValue::String(s) => format!("{:?}", s.inner()),
        _ => "…".into(),
    };
    let instead = match (name.as_str(), literal) {
        ("enqueued_at", LiteralValue::String(_)) => format!("; write timestamp({text})"),
        ("age", LiteralValue::String(_)) => format!("; write duration({text})"),
        ("age", _) => "; write a duration, such as duration(\"1h\")".into(),
        ("delivery_count", LiteralValue::String(_)) => "; write the number without quotes".into(),
        _ => String::new(),
    };
    let never = if equality {
        "never equals"
    } else {
        "does not compare with"
    };
    Some((
        lit_id,
        format!("`{name}` is {kind} (or null), which {never} {given}{instead}"),
    ))
}

/// CEL's standard library, its strings extension, and `matches`.
fn filter_env() -> Env {
    // Without cel's `regex` feature its stdlib has no `matches`: ours,
    // below, is registered instead.
    let mut env = Env::stdlib();
    // String helpers (lowerAscii, replace, split...) are what DLQ triage
    // filters reach for first.
    env.add_extension(cel::extensions::strings)
        .expect("the strings extension registers once");
    cel::add_overload!(env, fn regex_matches: (CelString, CelString) -> Result<CelBool>, name = "matches", id = "matches")
        .expect("`matches` registers once");
    cel::add_member_overload!(env, fn regex_matches: (CelString, CelString) -> Result<CelBool>, name = "matches")
        .expect("`string.matches` registers once");
    env
}

thread_local! {
    /// The compiled literal patterns of the filter this thread evaluates.
    static PATTERNS_IN_USE: std::cell::RefCell<Option<Arc<HashMap<String, regex::Regex>>>> =
        const { std::cell::RefCell::new(None) };
}

/// [`PATTERNS_IN_USE`] for the length of one evaluation, on this thread.
struct PatternsInUse;

impl PatternsInUse {
    fn set(patterns: &Arc<HashMap<String, regex::Regex>>) -> Option<Self> {
        if patterns.is_empty() {
            return None;
        }
        PATTERNS_IN_USE.with(|p| *p.borrow_mut() = Some(patterns.clone()));
        Some(PatternsInUse)
    }
}

impl Drop for PatternsInUse {
    fn drop(&mut self) {
        PATTERNS_IN_USE.with(|p| p.borrow_mut().take());
    }
}

/// The pattern of a `matches` call, when it is a string literal.
fn literal_pattern(call: &CallExpr) -> Option<&str> {
    let pattern = match (call.func_name.as_str(), &call.target, call.args.as_slice()) {
        ("matches", Some(_), [pattern]) | ("matches", None, [_, pattern]) => pattern,
        _ => return None,
    };
    match &pattern.expr {
        Expr::Literal(LiteralValue::String(p)) => Some(p.inner()),
        _ => None,
    }
}

/// CEL's `matches` (RE2 syntax, true when the pattern matches anywhere in
/// the string), as cel's own but for one thing: cel's compiles the pattern
/// at every call, that is for every message a redrive examines, and a
/// pattern compiles far slower than it matches a short reason. The filter's
/// literal patterns are compiled once, when it is; a pattern built from the
/// message is still compiled at each call, and never kept (one under 1 KiB
/// can compile to megabytes).
fn regex_matches(this: &CelString<'_>, pattern: &CelString<'_>) -> Result<CelBool, ExecutionError> {
    let pattern = pattern.inner();
    let kept = PATTERNS_IN_USE.with(|p| {
        p.borrow()
            .as_ref()
            .and_then(|patterns| patterns.get(pattern).map(|regex| regex.is_match(this.inner())))
    });
    let matched = match kept {
        Some(matched) => Ok(matched),
        None => regex::Regex::new(pattern)
            .map(|regex| regex.is_match(this.inner()))
            .map_err(|e| format!("'{pattern}' not a valid regex:\n{e}")),
    };
    matched
        .map(CelBool::from)
        .map_err(|message| ExecutionError::FunctionError {
            function: "matches".to_string(),
            message,
        })
}

/// Why `call` fails whatever the message, when it is `duration` or
/// `timestamp` of a literal, `matches` with a literal pattern, or a
/// timestamp accessor with a literal time zone (`getHours("Europe/Paris")`):
/// the call evaluated once, with an empty string standing for what `matches`
/// tests and the epoch for the timestamp.
fn bad_literal_argument(env: &Arc<Env>, call: &CallExpr) -> Option<String> {
    let literal = |e: &IdedExpr| matches!(e.expr, Expr::Literal(_));
    let on = |target: Expr, arg: &IdedExpr| CallExpr {
        func_name: call.func_name.clone(),
        target: Some(Box::new(IdedExpr { id: 0, expr: target })),
        args: vec![arg.clone()],
    };
    let probe = match (call.func_name.as_str(), &call.target, call.args.as_slice()) {
        ("duration" | "timestamp", None, [arg]) if literal(arg) => call.clone(),
        ("matches", Some(_), [pattern]) | ("matches", None, [_, pattern]) if literal(pattern) => {
            on(Expr::Literal(LiteralValue::String("".into())), pattern)
        }
        (get, Some(_), [zone]) if get.starts_with("get") && literal(zone) => {
            let epoch = CallExpr {
                func_name: "timestamp".into(),
                target: None,
                args: vec![IdedExpr {
                    id: 0,
                    expr: Expr::Literal(LiteralValue::Int(0.into())),
                }],
            };
            on(Expr::Call(epoch), zone)
        }
        _ => return None,
    };
    let expr = IdedExpr {
        id: 0,
        expr: Expr::Call(probe),
    };
    let error = Value::resolve(&expr, &Context::with_env(env.clone()))
        .err()?
        .to_string();
    // The crate's wrapper names the function the error line names already.
    let error = error
        .strip_prefix(&format!("Error executing function '{}': ", call.func_name))
        .or_else(|| error.strip_prefix("Error executing function 'timezone': "))
        .unwrap_or(&error);
    let text = match call.args.as_slice() {
        [
            IdedExpr {
                expr: Expr::Literal(LiteralValue::String(s)),
                ..
            },
        ] => format!("{:?}", s.inner()),
        _ => String::new(),
    };
    Some(match call.func_name.as_str() {
        // The duration parser's own error ("Parsing Error: Error { input:
        // \"d\", code: Char }") says nothing a user can act on.
        "duration" => {
            format!("{text} is not a duration: a number and a unit of h, m, s, ms, us or ns (168h for 7 days, 1h30m)")
        }
        "timestamp" => format!("{text} is not an RFC 3339 timestamp such as 2026-01-31T00:00:00Z ({error})"),
        get if get.starts_with("get") => {
            format!("{error} (a time zone is an IANA name such as Europe/Paris, or an offset such as +02:00)")
        }
        _ => error.to_string(),
    })
}

/// Whether `call` is a call to a namespaced function (`optional.of(x)`,
/// `strings.quote(s)`), which the parser reads as a method on a variable
/// named `optional` or `strings`. Asked as [`is_unknown_function`] asks: a
/// call that is no such function resolves its target, the namespace's first
/// segment, and fails on that name.
fn is_namespaced_call(env: &Arc<Env>, call: &CallExpr) -> bool {
    let Some(namespace) = call.target.as_deref().and_then(qualified_name) else {
        return false;
    };
    let root = namespace.split('.').next().unwrap_or_default();
    undeclared(env, &format!("{namespace}.{}()", call.func_name)).is_none_or(|n| n != root)
}

/// `a.b.c` for an identifier or a chain of field selections on one.
fn qualified_name(expr: &IdedExpr) -> Option<String> {
    match &expr.expr {
        Expr::Ident(name) => Some(name.clone()),
        Expr::Select(select) if !select.test => {
            qualified_name(&select.operand).map(|q| format!("{q}.{}", select.field))
        }
        _ => None,
    }
}

/// The name `probe`, run on an empty context, fails on as undeclared.
fn undeclared(env: &Arc<Env>, probe: &str) -> Option<String> {
    match env.compile(probe).ok()?.execute(&Context::with_env(env.clone())) {
        Err(ExecutionError::UndeclaredReference(n)) => Some(n.to_string()),
        _ => None,
    }
}

/// The identifiers `expr` reads from its context: [`cel::Program::references`]
/// without the variables of its macros (`attributes.exists(k, k == "x")`
/// binds `k`; counted as a reference, it was refused as unknown). `calls`
/// gets every call, operators included, with the node that carries its
/// position.
fn free_variables<'e>(
    env: &Arc<Env>,
    expr: &'e IdedExpr,
    bound: &mut Vec<&'e str>,
    out: &mut BTreeMap<&'e str, Vec<u64>>,
    calls: &mut Vec<(u64, &'e CallExpr)>,
) {
    match &expr.expr {
        Expr::Unspecified | Expr::Literal(_) => {}
        Expr::Ident(name) => {
            // `@`-names are the parser's own (a macro's accumulator).
            if !name.starts_with('@') && !bound.contains(&name.as_str()) {
                out.entry(name).or_default().push(expr.id);
            }
        }
        Expr::Call(call) if call.target.is_some() && is_namespaced_call(env, call) => {
            for arg in &call.args {
                free_variables(env, arg, bound, out, calls);
            }
        }
        Expr::Call(call) => {
            calls.push((expr.id, call));
            if let Some(target) = &call.target {
                free_variables(env, target, bound, out, calls);
            }
            for arg in &call.args {
                free_variables(env, arg, bound, out, calls);
            }
        }
        Expr::Comprehension(c) => {
            free_variables(env, &c.iter_range, bound, out, calls);
            free_variables(env, &c.accu_init, bound, out, calls);
            let depth = bound.len();
            bound.push(&c.iter_var);
            bound.extend(c.iter_var2.as_deref());
            bound.push(&c.accu_var);
            for e in [&c.loop_cond, &c.loop_step, &c.result] {
                free_variables(env, e, bound, out, calls);
            }
            bound.truncate(depth);
        }
        Expr::List(list) => {
            for e in &list.elements {
                free_variables(env, e, bound, out, calls);
            }
        }
        Expr::Select(select) => free_variables(env, &select.operand, bound, out, calls),
        Expr::Map(MapExpr { entries }) | Expr::Struct(StructExpr { entries, .. }) => {
            for entry in entries {
                match &entry.expr {
                    EntryExpr::StructField(field) => free_variables(env, &field.value, bound, out, calls),
                    EntryExpr::MapEntry(e) => {
                        free_variables(env, &e.key, bound, out, calls);
                        free_variables(env, &e.value, bound, out, calls);
                    }
                }
            }
        }
    }
}

/// The attribute keys `expr` reads, when it reads `attributes` only by a
/// constant key (`attributes.tenant`, `attributes["x-id"]`,
/// `has(attributes.k)`); `None` when a use needs the whole map
/// (`size(attributes)`, `"k" in attributes`, a macro over it, a computed
/// key). A map of just those keys gives the same result, since no other key
/// is ever looked up, and costs one entry instead of one per attribute.
fn attribute_keys(expr: &IdedExpr) -> Option<Vec<String>> {
    let mut keys = Vec::new();
    keyed_uses_only(expr, &mut keys).then(|| {
        keys.sort();
        keys.dedup();
        keys
    })
}

fn keyed_uses_only(expr: &IdedExpr, keys: &mut Vec<String>) -> bool {
    let is_attributes = |e: &IdedExpr| matches!(&e.expr, Expr::Ident(n) if n == "attributes");
    match &expr.expr {
        Expr::Unspecified | Expr::Literal(_) => true,
        Expr::Ident(name) => name != "attributes",
        Expr::Select(select) if is_attributes(&select.operand) => {
            keys.push(select.field.clone());
            true
        }
        Expr::Select(select) => keyed_uses_only(&select.operand, keys),
        Expr::Call(call)
            if call.func_name == cel::common::ast::operators::INDEX
                && call.target.is_none()
                && call.args.len() == 2
                && is_attributes(&call.args[0]) =>
        {
            match &call.args[1].expr {
                Expr::Literal(LiteralValue::String(key)) => {
                    keys.push(key.inner().to_string());
                    true
                }
                _ => false,
            }
        }
        Expr::Call(call) => all_keyed(call.target.as_deref().into_iter().chain(&call.args), keys),
        Expr::Comprehension(c) => {
            // A macro's own variable named `attributes` hides the message's.
            let shadows = [Some(&c.iter_var), c.iter_var2.as_ref(), Some(&c.accu_var)]
                .into_iter()
                .flatten()
                .any(|v| v == "attributes");
            !shadows
                && all_keyed(
                    [&c.iter_range, &c.accu_init, &c.loop_cond, &c.loop_step, &c.result],
                    keys,
                )
        }
        Expr::List(list) => all_keyed(&list.elements, keys),
        Expr::Map(MapExpr { entries }) | Expr::Struct(StructExpr { entries, .. }) => {
            entries.iter().all(|entry| match &entry.expr {
                EntryExpr::StructField(field) => keyed_uses_only(&field.value, keys),
                EntryExpr::MapEntry(e) => keyed_uses_only(&e.key, keys) && keyed_uses_only(&e.value, keys),
            })
        }
    }
}

fn all_keyed<'e>(exprs: impl IntoIterator<Item = &'e IdedExpr>, keys: &mut Vec<String>) -> bool {
    exprs.into_iter().all(|e| keyed_uses_only(e, keys))
}

/// Bind the variables the expression uses (`uses(name)`); the others are never
/// read, so building them (a copy of the body, a map of the attributes) would
/// be wasted work on every message. Strings and bytes borrow from `msg`, and
/// `attributes` is built once as the interpreter's own map, of `keys` alone
/// when the expression reads no others: going through [`cel::Value`] built
/// the map three times per message (a `HashMap`, the `Value`'s, then a clone
/// converted entry by entry), most of a redrive's filter cost
/// (bench/analysis.md, seventh round).
fn bind_message<'m>(
    ctx: &mut Context<'_, 'm>,
    msg: &'m DlqMessage,
    now: DateTime<Utc>,
    uses: impl Fn(&str) -> bool,
    keys: Option<&[String]>,
) {
    if uses("id") {
        ctx.add_variable_as_val("id", Box::new(CelString::from(msg.id.as_str())));
    }
    if uses("body") {
        ctx.add_variable_as_val("body", Box::new(CelString::from(String::from_utf8_lossy(&msg.body))));
    }
    // Parsing the body costs more than everything else here.
    if uses("json") {
        ctx.add_variable_from_value("json", json_of(msg));
    }
    if uses("attributes") {
        let entry = |(k, a): (&'m String, &'m Attribute)| (CelMapKey::from(k.as_str()), attr_val(a));
        let attrs: HashMap<CelMapKey<'m>, Box<dyn Val + 'm>> = match keys {
            Some(keys) => keys
                .iter()
                .filter_map(|k| msg.attributes.get_key_value(k))
                .map(entry)
                .collect(),
            None => msg.attributes.iter().map(entry).collect(),
        };
        ctx.add_variable_as_val("attributes", Box::new(CelMap::from(attrs)));
    }
    if uses("reason") {
        ctx.add_variable_as_val("reason", optional_str(&msg.reason));
    }
    if uses("description") {
        ctx.add_variable_as_val("description", optional_str(&msg.description));
    }
    if uses("delivery_count") {
        ctx.add_variable_as_val(
            "delivery_count",
            match msg.delivery_count {
                Some(n) => Box::new(CelInt::from(i64::from(n))),
                None => Box::new(CelNull),
            },
        );
    }
    if uses("enqueued_at") {
        ctx.add_variable_as_val(
            "enqueued_at",
            match msg.enqueued_at {
                Some(t) => Box::new(CelTimestamp::from(t.fixed_offset())),
                None => Box::new(CelNull),
            },
        );
    }
    if uses("age") {
        ctx.add_variable_as_val(
            "age",
            match msg.enqueued_at {
                Some(t) => Box::new(CelDuration::from(now - t)),
                None => Box::new(CelNull),
            },
        );
    }
    if uses("source") {
        ctx.add_variable_as_val("source", optional_str(&msg.source));
    }
}

fn optional_str(s: &Option<String>) -> Box<dyn Val + '_> {
    match s {
        Some(s) => Box::new(CelString::from(s.as_str())),
        None => Box::new(CelNull),
    }
}

/// [`attr_to_cel`] without the copy: text and bytes borrow from the message.
fn attr_val(a: &Attribute) -> Box<dyn Val + '_> {
    if a.is_null() {
        return Box::new(CelNull);
    }
    match &a.value {
        AttrValue::String(s) => Box::new(CelString::from(s.as_str())),
        AttrValue::Number(s) => match s.parse::<i64>() {
            Ok(i) => Box::new(CelInt::from(i)),
            Err(_) => match s.parse::<f64>() {
                Ok(f) => Box::new(CelDouble::from(f)),
                Err(_) => Box::new(CelString::from(s.as_str())),
            },
        },
        AttrValue::Binary(b) => Box::new(CelBytes::from(&b[..])),
        AttrValue::Bool(b) => Box::new(CelBool::from(*b)),
        AttrValue::Int(i) => Box::new(CelInt::from(*i)),
        AttrValue::Float(f) => Box::new(CelDouble::from(*f)),
        AttrValue::Timestamp(t) => Box::new(CelTimestamp::from(t.fixed_offset())),
        AttrValue::Uuid(u) => Box::new(CelString::from(u.to_string())),
    }
}

/// The body parsed as JSON, or null. A UTF-8 byte order mark before it is
/// not part of the JSON text (RFC 8259 §8.1 lets a parser ignore it, and
/// .NET and PowerShell writers put one there): serde_json refuses it, which
/// made such a body `json == null`.
fn json_of(msg: &DlqMessage) -> Value {
    let text = msg.body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&msg.body);
    serde_json::from_slice::<serde_json::Value>(text)
        .map(|v| json_to_cel(&v))
        .unwrap_or(Value::Null)
}

/// Every variable, each as a [`cel::Value`]: see [`Filter::matches_reference`].
fn bind_message_by_value(ctx: &mut Context<'_, '_>, msg: &DlqMessage, now: DateTime<Utc>) {
    ctx.add_variable_from_value("id", msg.id.clone());
    ctx.add_variable_from_value("body", msg.body_text());
    ctx.add_variable_from_value("json", json_of(msg));
    let attrs: HashMap<String, Value> = msg
        .attributes
        .iter()
        .map(|(k, a)| (k.clone(), attr_to_cel(a)))
        .collect();
    ctx.add_variable_from_value("attributes", attrs);
    ctx.add_variable_from_value("reason", msg.reason.clone());
    ctx.add_variable_from_value("description", msg.description.clone());
    ctx.add_variable_from_value("delivery_count", msg.delivery_count.map(i64::from));
    ctx.add_variable_from_value(
        "enqueued_at",
        msg.enqueued_at
            .map(|t| Value::Timestamp(t.fixed_offset()))
            .unwrap_or(Value::Null),
    );
    ctx.add_variable_from_value(
        "age",
        msg.enqueued_at.map(|t| Value::Duration(now - t)).unwrap_or(Value::Null),
    );
    ctx.add_variable_from_value("source", msg.source.clone());
}

/// SQS numbers arrive as text; expose them as numbers so `attributes.n > 3`
/// works, and keep the text when it is not a plain number. A Service Bus
/// property set to null is null, not the empty string that carries it.
fn attr_to_cel(a: &Attribute) -> Value {
    if a.is_null() {
        return Value::Null;
    }
    match &a.value {
        AttrValue::String(s) => Value::from(s.as_str()),
        AttrValue::Number(s) => s
            .parse::<i64>()
            .map(Value::Int)
            .or_else(|_| s.parse::<f64>().map(Value::Float))
            .unwrap_or_else(|_| Value::from(s.as_str())),
        AttrValue::Binary(b) => Value::Bytes(Arc::new(b.to_vec())),
        AttrValue::Bool(b) => Value::Bool(*b),
        AttrValue::Int(i) => Value::Int(*i),
        AttrValue::Float(f) => Value::Float(*f),
        AttrValue::Timestamp(t) => Value::Timestamp(t.fixed_offset()),
        AttrValue::Uuid(u) => Value::from(u.to_string()),
    }
}

fn json_to_cel(v: &serde_json::Value) -> Value {
    match v {
        serde_json::Value::Null => Value::Null,
        serde_json::Value::Bool(b) => Value::Bool(*b),
        serde_json::Value::Number(n) => n
            .as_i64()
            .map(Value::Int)
            .or_else(|| n.as_u64().map(Value::UInt))
            .unwrap_or_else(|| Value::Float(n.as_f64().unwrap_or(f64::NAN))),
        serde_json::Value::String(s) => Value::from(s.as_str()),
        serde_json::Value::Array(items) => Value::List(Arc::new(items.iter().map(json_to_cel).collect())),
        serde_json::Value::Object(map) => {
            let m: HashMap<String, Value> = map.iter().map(|(k, v)| (k.clone(), json_to_cel(v))).collect();
            Value::from(m)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn msg() -> DlqMessage {
        let now = Utc::now();
        let mut attributes = crate::model::Attributes::new();
        attributes.insert("tenant".into(), Attribute::string("acme"));
        attributes.insert(
            "retries".into(),
            Attribute {
                value: AttrValue::Number("3".into()),
                data_type: Some("Number".into()),
            },
        );
        DlqMessage {
            id: "m-1".into(),
            body: Bytes::from_static(br#"{"order": {"id": 42, "total": 9.5}}"#),
            attributes,
            properties: Default::default(),
            reason: Some("Timeout".into()),
            description: None,
            delivery_count: Some(5),
            enqueued_at: Some(now - chrono::Duration::hours(2)),
            source: Some("orders".into()),
            ordering_key: None,
        }
    }

    fn eval(src: &str) -> Result<bool, String> {
        Filter::compile(src).unwrap().matches(&msg(), Utc::now())
    }

    #[test]
    fn a_json_body_after_a_byte_order_mark_is_parsed() {
        let mut m = msg();
        m.body = Bytes::from_static(b"\xEF\xBB\xBF{\"order\": {\"id\": 42}}");
        for f in ["json.order.id == 42", "type(json) == map", "json != null"] {
            assert_eq!(Filter::compile(f).unwrap().matches(&m, Utc::now()), Ok(true), "{f}");
            assert_eq!(
                Filter::compile(f).unwrap().matches_reference(&m, Utc::now()),
                Ok(true),
                "{f} (by value)"
            );
        }
        // Only a leading mark goes: one elsewhere is not JSON.
        m.body = Bytes::from_static(b"{\"a\": 1}\xEF\xBB\xBF");
        assert_eq!(
            Filter::compile("json == null").unwrap().matches(&m, Utc::now()),
            Ok(true)
        );
    }

    #[test]
    fn variables_are_bound() {
        assert_eq!(eval(r#"attributes.tenant == "acme""#), Ok(true));
        assert_eq!(eval(r#"reason == "Timeout" && age > duration("1h")"#), Ok(true));
        assert_eq!(eval(r#"age > duration("3h")"#), Ok(false));
        assert_eq!(eval("json.order.id == 42 && json.order.total > 9.0"), Ok(true));
        assert_eq!(eval("delivery_count >= 5 && attributes.retries == 3"), Ok(true));
        assert_eq!(
            eval(r#"body.contains("order") && id == "m-1" && source == "orders""#),
            Ok(true)
        );
        assert_eq!(eval("description == null"), Ok(true));
        assert_eq!(eval(r#"enqueued_at < timestamp("2999-01-01T00:00:00Z")"#), Ok(true));
        assert_eq!(eval(r#"reason.lowerAscii() == "timeout""#), Ok(true));
        assert_eq!(eval(r#"reason.matches("^Time")"#), Ok(true));
    }

    /// `matches` keeps CEL's meaning (a match anywhere, RE2 syntax, both
    /// call forms). A filter's literal patterns are compiled with it, and
    /// only for its own evaluations; a pattern taken from the message is
    /// compiled at each call and fails every time it does not compile.
    #[test]
    fn matches_compiles_literal_patterns_once_and_keeps_cels_meaning() {
        assert_eq!(eval(r#"reason.matches("out")"#), Ok(true));
        assert_eq!(eval(r#"reason.matches("^out")"#), Ok(false));
        assert_eq!(eval(r#"matches(reason, "^Time(out)?$")"#), Ok(true));
        assert_eq!(eval(r#"reason.matches("(?i)^TIMEOUT$")"#), Ok(true));
        assert_eq!(eval(r#"body.matches(reason) == body.contains(reason)"#), Ok(true));
        let f = Filter::compile(r#"reason.matches("^Time") && ["a"].exists(x, matches(x, "a+"))"#).unwrap();
        let mut kept: Vec<&str> = f.patterns.keys().map(String::as_str).collect();
        kept.sort();
        assert_eq!(kept, ["^Time", "a+"]);
        assert_eq!(f.matches(&msg(), Utc::now()), Ok(true));
        PATTERNS_IN_USE.with(|p| assert!(p.borrow().is_none(), "only for the evaluation"));
        let mut m = msg();
        let dynamic = Filter::compile("reason.matches(body)").unwrap();
        assert!(dynamic.patterns.is_empty());
        m.body = b"(".to_vec().into();
        for _ in 0..2 {
            let err = dynamic.matches(&m, Utc::now()).unwrap_err();
            assert!(err.contains("'(' not a valid regex"), "{err}");
        }
        m.body = b"^Time".to_vec().into();
        assert_eq!(dynamic.matches(&m, Utc::now()), Ok(true));
        assert_eq!(dynamic.matches_reference(&m, Utc::now()), Ok(true));
    }

    /// The borrowed binding `matches` uses agrees with the reference, which
    /// builds every variable as a `cel::Value`, on every attribute type, on
    /// missing fields and on a body that is not UTF-8, errors included.
    #[test]
    fn borrowed_binding_agrees_with_the_value_binding() {
        let mut typed = msg();
        let mut put = |k: &str, value: AttrValue| {
            typed.attributes.insert(k.into(), Attribute { value, data_type: None });
        };
        put("flag", AttrValue::Bool(true));
        put("ratio", AttrValue::Float(0.25));
        put("count", AttrValue::Int(-7));
        put("price", AttrValue::Number("9.5".into()));
        put("code", AttrValue::Number("0x1F".into()));
        put("raw", AttrValue::Binary(Bytes::from_static(b"\x00\xffab")));
        put("at", AttrValue::Timestamp(Utc::now()));
        put("uuid", AttrValue::Uuid(uuid::Uuid::from_u128(7)));
        typed.attributes.insert(
            "cleared".into(),
            Attribute {
                value: AttrValue::String(String::new()),
                data_type: Some("null".into()),
            },
        );
        let mut bare = msg();
        bare.attributes.clear();
        bare.reason = None;
        bare.source = None;
        bare.delivery_count = None;
        bare.enqueued_at = None;
        bare.body = Bytes::from_static(b"\xff\xfe not utf-8");
        let filters = [
            r#"attributes.tenant == "acme""#,
            "attributes.retries == 3 && attributes.price > 9.0",
            r#"attributes.code == "0x1F" && attributes.flag && attributes.ratio < 1.0"#,
            r#"attributes.count == -7 && attributes.raw == b"\x00\xffab""#,
            r#"attributes.at < timestamp("2999-01-01T00:00:00Z") && attributes.uuid.startsWith("0000")"#,
            r#"size(attributes) > 3 && "tenant" in attributes && attributes.exists(k, k == "flag")"#,
            r#"attributes == {"tenant": "acme", "retries": 3}"#,
            r#"has(attributes.missing) || attributes.missing == "x""#,
            r#"attributes.cleared == null || attributes.cleared == """#,
            r#"attributes.all(k, k.size() > 1) && type(attributes) == map"#,
            r#"reason == "Timeout" && description == null && source == "orders" && id == "m-1""#,
            "delivery_count > 2 && age > duration(\"1h\") && enqueued_at < timestamp(\"2999-01-01T00:00:00Z\")",
            r#"body.contains("order") && json.order.id == 42"#,
            r#"reason.startsWith("T") || source.size() > 0"#,
            "delivery_count == null && enqueued_at == null && age == null",
            "json.order.id",
            r#"attributes["tenant"] == "acme" && !has(attributes.kind)"#,
            r#"attributes[reason] == "x" || attributes["re" + "tries"] == 3"#,
            r#"[1].exists(attributes, attributes > 0) && attributes.tenant == "acme""#,
            r#"{"k": attributes.tenant}.k == "acme" && [attributes.retries][0] == 3"#,
        ];
        let now = Utc::now();
        for m in [msg(), typed, bare] {
            for f in filters {
                let filter = Filter::compile(f).unwrap();
                assert_eq!(
                    filter.matches(&m, now),
                    filter.matches_reference(&m, now),
                    "`{f}` on message with attributes {:?}",
                    m.attributes.keys().collect::<Vec<_>>()
                );
            }
        }
    }

    /// Only the attributes read by a constant key are bound; any other use
    /// binds them all.
    #[test]
    fn the_attribute_keys_a_filter_reads_are_found_or_none() {
        let keys = |f: &str| Filter::compile(f).unwrap().attribute_keys.map(|k| k.to_vec());
        let some = |k: &[&str]| Some(k.iter().map(|k| k.to_string()).collect::<Vec<_>>());
        assert_eq!(keys(r#"attributes.tenant == "acme""#), some(&["tenant"]));
        assert_eq!(
            keys(r#"attributes["x-id"] == "1" && has(attributes.kind) || attributes.tenant == attributes.kind"#),
            some(&["kind", "tenant", "x-id"])
        );
        assert_eq!(keys(r#"reason == "Timeout""#), some(&[]));
        for whole in [
            "size(attributes) > 2",
            r#""k" in attributes"#,
            r#"attributes.exists(k, k == "x")"#,
            r#"attributes[reason] == "x""#,
            r#"attributes == {"a": "b"}"#,
            r#"[1].exists(attributes, attributes > 0) && attributes.a == "b""#,
        ] {
            assert_eq!(keys(whole), None, "{whole}");
        }
    }

    /// A Service Bus property set to null read as "" in a filter: `== null`
    /// never matched it, and `== ""` matched it as if it were text.
    #[test]
    fn a_null_service_bus_property_is_null() {
        let mut m = msg();
        let null = Attribute {
            value: AttrValue::String(String::new()),
            data_type: Some("null".into()),
        };
        m.attributes.insert("cleared".into(), null);
        m.attributes.insert("blank".into(), Attribute::string(""));
        let now = Utc::now();
        for f in [
            "attributes.cleared == null",
            r#"attributes.cleared != """#,
            "has(attributes.cleared)",
            r#"attributes.blank == "" && attributes.blank != null"#,
        ] {
            let filter = Filter::compile(f).unwrap();
            assert_eq!(filter.matches(&m, now), Ok(true), "{f}");
            assert_eq!(filter.matches_reference(&m, now), Ok(true), "{f}");
        }
    }

    /// `json` is whatever JSON the body holds, not only an object.
    #[test]
    fn json_is_any_json_value_or_null() {
        let now = Utc::now();
        for (body, f) in [
            (&b"[1, 2]"[..], "type(json) == list && json[1] == 2"),
            (br#""text""#, r#"json == "text""#),
            (b"42", "json == 42"),
            (b"true", "json"),
            (b"null", "json == null"),
            (b"not json", "json == null"),
            (b"\xff", "json == null"),
        ] {
            let mut m = msg();
            m.body = Bytes::copy_from_slice(body);
            assert_eq!(Filter::compile(f).unwrap().matches(&m, now), Ok(true), "{f}");
        }
    }

    #[test]
    fn evaluation_error_is_reported_not_raised() {
        let err = eval(r#"attributes.missing == "x""#).unwrap_err();
        assert!(err.contains("missing"), "{err}");
        // Compiles (a JSON body may hold a bool), yields an int here.
        let err = eval("json.order.id").unwrap_err();
        assert!(err.contains("bool"), "{err}");
        assert_eq!(
            eval(r#"has(attributes.missing) && attributes.missing == "x""#),
            Ok(false)
        );
    }

    #[test]
    fn the_commonest_slips_say_what_cel_writes_instead() {
        let err = Filter::compile(r#"reason = "Timeout""#).unwrap_err().to_string();
        assert!(err.contains("(CEL compares with `==`)"), "{err}");
        let err = Filter::compile(r#"reason == "a" and age > duration("1h")"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("(CEL writes `&&`, `||` and `!`)"), "{err}");
        let err = Filter::compile(r#"reason == "a" or reason == "b""#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("(CEL writes `&&`, `||` and `!`)"), "{err}");
    }

    #[test]
    fn syntax_error_reports_position() {
        let err = Filter::compile(r#"reason == "Timeout" &&"#).unwrap_err();
        match &err {
            FilterError::Syntax { line, column, .. } => {
                assert_eq!(*line, 1);
                assert!(*column >= 20, "{err}");
            }
            other => panic!("expected a syntax error, got {other:?}"),
        }
        let text = err.to_string();
        assert!(text.starts_with("invalid filter at 1:"), "{text}");
        assert!(text.contains('^'), "{text}");
        // Mid-line, the column is the offending token's first character (it
        // was one past it: only an error at the end of a line, clamped, hid it).
        let err = Filter::compile(r#"reason == "a" && && true"#).unwrap_err();
        assert!(matches!(err, FilterError::Syntax { column: 18, .. }), "{err}");
        assert!(
            err.to_string()
                .ends_with("\n  reason == \"a\" && && true\n                   ^"),
            "{err}"
        );
        let err = Filter::compile("delivery_count > 1 &&\n  has(1)").unwrap_err();
        assert!(matches!(err, FilterError::Syntax { line: 2, column: 7, .. }), "{err}");
        // An unfinished conditional: the syntax error, not the parser's
        // internal complaint about the expression it could not build.
        let err = Filter::compile("reason == 'x' ? 1").unwrap_err();
        assert!(
            matches!(
                err,
                FilterError::Syntax {
                    line: 1,
                    column: 18,
                    ..
                }
            ),
            "{err}"
        );
        assert!(!err.to_string().contains("ExprContext"), "{err}");
    }

    #[test]
    fn macro_variables_and_type_names_are_not_unknown_variables() {
        assert_eq!(eval(r#"attributes.exists(k, k == "tenant")"#), Ok(true));
        assert_eq!(eval("[1, 2].map(x, x * 2).all(y, y > delivery_count - 4)"), Ok(true));
        // A macro variable shadows a message variable only inside the macro.
        assert_eq!(
            eval(r#"attributes.exists(id, id == "tenant") && id == "m-1""#),
            Ok(true)
        );
        assert_eq!(eval("type(reason) == string && type(attributes) == map"), Ok(true));
        let f = Filter::compile(r#"attributes.exists(k, k == "tenant")"#).unwrap();
        assert!(f.uses[VARIABLES.iter().position(|v| *v == "attributes").unwrap()]);
        assert!(
            !f.uses
                .iter()
                .enumerate()
                .any(|(i, u)| *u && VARIABLES[i] != "attributes")
        );
        let unknown = |f: &str| match Filter::compile(f).unwrap_err() {
            FilterError::UnknownVariable { name, .. } => name,
            other => panic!("{other:?}"),
        };
        assert_eq!(unknown("attributes.exists(k, q == 1)"), "q");
        assert_eq!(unknown("[1].exists(k, k == 1) && k == 1"), "k");
    }

    /// A misspelt function compiled, then failed on every message: an
    /// inspect showed nothing and a redrive moved nothing, with no word of
    /// the typo. Known functions, member or global, standard or from the
    /// strings extension, and macros still compile.
    #[test]
    fn unknown_function_is_a_compile_error_with_its_position() {
        let err = Filter::compile(r#"reason.startswith("Time")"#).unwrap_err();
        match &err {
            FilterError::UnknownFunction { name, line, column, .. } => {
                assert_eq!((name.as_str(), *line), ("startswith", 1));
                assert!((7..=18).contains(column), "{err}");
            }
            other => panic!("expected an unknown function, got {other:?}"),
        }
        let text = err.to_string();
        assert!(
            text.starts_with("invalid filter at 1:") && text.contains("unknown function `startswith`"),
            "{text}"
        );
        let err = Filter::compile("delivery_count > 1 &&\n  sise(body) > 3").unwrap_err();
        assert!(
            matches!(&err, FilterError::UnknownFunction { name, line: 2, column: 3, .. } if name == "sise"),
            "{err:?}"
        );
        assert!(err.to_string().contains("\n    sise(body) > 3\n    ^"), "{err}");
        // Columns count characters, as the syntax errors' do (the parser's
        // call offsets are in bytes).
        let err = Filter::compile(r#"reason == "é😀" || fo(1)"#).unwrap_err();
        assert!(
            matches!(&err, FilterError::UnknownFunction { column: 19, .. }),
            "{err:?}"
        );
        let err = Filter::compile("reason.lowerascii().trimm() == body").unwrap_err();
        assert!(
            matches!(&err, FilterError::UnknownFunction { name, column: 8, .. } if name == "lowerascii"),
            "{err:?}"
        );
        let err = Filter::compile(r#"attributes.exists(k, k.startswith("x"))"#).unwrap_err();
        assert!(matches!(err, FilterError::UnknownFunction { .. }), "{err:?}");
        for known in [
            r#"reason.startsWith("T") && body.endsWith("}") && reason.contains("i")"#,
            r#"size(body) > 1 && body.size() > 1 && int(delivery_count) > 1 && string(delivery_count) == "5""#,
            r#"reason.lowerAscii().upperAscii().trim() == "TIMEOUT" && reason.replace("T", "t") == "timeout""#,
            r#"reason.split("e").size() == 2 && reason.indexOf("m") == 2 && reason.substring(1) == "imeout""#,
            r#"reason.matches("^T") && matches(reason, "^T") && type(reason) == string"#,
            r#"age > duration("1h") && enqueued_at.getFullYear() > 2000 && timestamp("2999-01-01T00:00:00Z") > enqueued_at"#,
            r#"double(delivery_count) > 1.0 && uint(delivery_count) > 1u && bytes(reason).size() == 7"#,
            r#"has(json.order) && json.order.exists(k, k == "id") && [1, 2].map(x, x * 2).filter(y, y > 2).size() == 1"#,
            r#"dyn(delivery_count) > 1 && [1, 2].exists_one(x, x > 1) && ["a"].join() == "a""#,
        ] {
            assert_eq!(eval(known), Ok(true), "{known}");
        }
    }

    /// Every filter the README shows, in its Filters examples and in the
    /// commands and config around it, compiles and matches a message it is
    /// written for.
    #[test]
    fn the_readme_filters_work() {
        let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
        let section = &readme[readme.find("### Filters").unwrap()..];
        let block = section.split("```\n").nth(1).unwrap();
        let mut examples: Vec<&str> = block.lines().collect();
        assert!(examples.len() >= 5, "{block}");
        for marker in ["--filter '", "filter: '"] {
            for (i, _) in readme.match_indices(marker) {
                let rest = &readme[i + marker.len()..];
                let f = &rest[..rest.find('\'').unwrap()];
                if !f.is_empty() && f != "..." {
                    examples.push(f);
                }
            }
        }
        // The variable table names every variable, and only those.
        let table: Vec<&str> = section
            .lines()
            .take_while(|l| !l.starts_with("```"))
            .filter_map(|l| l.strip_prefix("| `"))
            .flat_map(|l| l.split(" | ").next().unwrap().split(", "))
            .map(|v| v.trim_matches('`'))
            .collect();
        assert_eq!(table, VARIABLES, "README's variable table");
        let mut fits = msg();
        fits.attributes.insert("retry".into(), Attribute::string("yes"));
        fits.attributes.insert("x-retry-after".into(), Attribute::string("30"));
        fits.body = Bytes::from_static(br#"{"order": {"total": 120.5}}"#);
        fits.enqueued_at = Some(Utc::now() - chrono::Duration::days(2));
        let mut http = msg();
        http.reason = Some("503 Service Unavailable".into());
        http.body = Bytes::from_static(b"upstream: connection reset by peer");
        let mut invalid = msg();
        invalid.reason = Some("ValidationError".into());
        let now = Utc::now();
        for f in examples {
            let filter = Filter::compile(f).unwrap_or_else(|e| panic!("README filter `{f}`: {e}"));
            assert!(
                [&fits, &http, &invalid]
                    .iter()
                    .any(|m| filter.matches(m, now) == Ok(true)),
                "README filter `{f}` matches none of the messages written for it"
            );
        }
    }

    /// An unknown variable is reported at its first use in the text, past
    /// strings and fields that spell the same word, with the line quoted.
    /// `optional.of(x)` and `strings.quote(s)` are functions in namespaces;
    /// their namespace was refused as an unknown variable.
    #[test]
    fn namespaced_functions_compile() {
        assert_eq!(eval(r#"strings.quote(reason) == "\"Timeout\"""#), Ok(true));
        assert_eq!(
            eval(r#"attributes.?nope.orValue("x") == optional.of("x").value()"#),
            Ok(true)
        );
        assert_eq!(eval("optional.none().orValue(delivery_count) == 5"), Ok(true));
        // A namespace's unknown function, or one the crate does not load,
        // is still refused.
        for f in ["strings.qoute(reason)", "math.greatest(1, 2) == 2"] {
            assert!(Filter::compile(f).is_err(), "{f}");
        }
        // A namespace no extension declares is named as the function it
        // prefixes, not as an unknown variable; a misspelt variable with a
        // method that exists is still an unknown variable.
        let err = Filter::compile("delivery_count > 1 && math.abs(delivery_count) > 2").unwrap_err();
        assert!(
            matches!(&err, FilterError::UnknownFunction { name, line: 1, column: 23, .. } if name == "math.abs"),
            "{err:?}"
        );
        let err = Filter::compile(r#"atributes.startsWith("x")"#).unwrap_err();
        assert!(
            matches!(&err, FilterError::UnknownVariable { name, .. } if name == "atributes"),
            "{err:?}"
        );
        let f = Filter::compile("strings.quote(reason) != body").unwrap();
        let used: Vec<&str> = VARIABLES
            .iter()
            .zip(f.uses.iter())
            .filter(|(_, u)| **u)
            .map(|(v, _)| *v)
            .collect();
        assert_eq!(used, ["body", "reason"]);
    }

    /// `duration("7d")` (the `7d` --older-than takes), a date without a
    /// time, and a regex that does not compile failed on every message at
    /// run time with the crate's parser error; they are compile errors now.
    #[test]
    fn a_literal_argument_that_can_never_work_is_a_compile_error() {
        let err = Filter::compile(r#"reason == "Timeout" && age > duration("7d")"#).unwrap_err();
        match &err {
            FilterError::BadArgument {
                function, line, column, ..
            } => assert_eq!((function.as_str(), *line, *column), ("duration", 1, 30)),
            other => panic!("{other:?}"),
        }
        let text = err.to_string();
        assert!(
            text.starts_with(r#"invalid filter at 1:30: duration(): "7d" is not a duration"#)
                && text.contains("168h for 7 days"),
            "{text}"
        );
        let err = Filter::compile(r#"enqueued_at < timestamp("2026-01-01")"#).unwrap_err();
        assert!(err.to_string().contains("RFC 3339"), "{err}");
        let err = Filter::compile(r#"enqueued_at.getHours("Europe/Pari") < 9"#).unwrap_err();
        assert!(
            matches!(&err, FilterError::BadArgument { function, column: 13, .. } if function == "getHours"),
            "{err:?}"
        );
        assert!(
            err.to_string()
                .contains("unknown time zone Europe/Pari (a time zone is an IANA name"),
            "{err}"
        );
        for f in [r#"reason.matches("(Time")"#, r#"matches(reason, "[a-")"#] {
            let err = Filter::compile(f).unwrap_err();
            assert!(
                matches!(err, FilterError::BadArgument { ref function, .. } if function == "matches"),
                "{f}: {err}"
            );
        }
        // Valid literals, and arguments that are not literals, compile.
        for f in [
            r#"age > duration("168h") && age < duration("1h30m15s") && duration("-1.5h") < age"#,
            r#"enqueued_at < timestamp("2999-01-01T00:00:00+02:00")"#,
            r#"reason.matches("^Time(out)?$") && matches(reason, "[A-Z]")"#,
            r#"age > duration(reason) || reason.matches(body) || true"#,
            r#"enqueued_at.getHours("Europe/Paris") > 8 && enqueued_at.getDayOfWeek("+02:00") < 6"#,
            r#"enqueued_at.getHours() >= 0 && age.getHours() >= 0"#,
        ] {
            assert!(Filter::compile(f).is_ok(), "{f}");
        }
    }

    /// The parser's own errors (a macro's) count bytes: the column is
    /// given in characters, as the syntax errors' are.
    #[test]
    fn a_macro_error_after_multibyte_text_names_its_character_column() {
        let f = r#""日本語日本語" == reason || has(reason)"#;
        match Filter::compile(f) {
            Err(FilterError::Syntax { line, column, .. }) => {
                // At `reason` inside `has(`: the 27th character, the 39th byte.
                assert_eq!((line, column), (1, 27), "{f}");
            }
            other => panic!("{other:?}"),
        }
    }

    /// A filter whose value is never a bool compiled, and failed on every
    /// message a redrive leased: it is refused, at its start.
    #[test]
    fn a_filter_that_is_never_true_or_false_is_a_compile_error() {
        for (f, what) in [
            ("reason", "a string"),
            ("1", "a number"),
            (r#""acme""#, "a string"),
            ("delivery_count + 1", "arithmetic"),
            ("  attributes", "a map"),
            ("[true]", "a list"),
        ] {
            match Filter::compile(f) {
                Err(FilterError::TypeMismatch {
                    message, line, column, ..
                }) => {
                    assert!(message.contains(&format!("this is {what}")), "{f}: {message}");
                    // At its start, or at the operator of arithmetic.
                    let at = if what == "arithmetic" {
                        f.find('+').unwrap() + 1
                    } else {
                        f.len() - f.trim_start().len() + 1
                    };
                    assert_eq!((line, column), (1, at), "{f}");
                }
                other => panic!("{f}: {other:?}"),
            }
        }
        for f in [
            "true",
            "json",
            "json.ok",
            "attributes.retry == \"yes\"",
            "[1].all(x, x > 0)",
            "reason in [\"a\"]",
        ] {
            assert!(Filter::compile(f).is_ok(), "{f}");
        }
    }

    /// A message variable compared with a literal of the wrong type failed
    /// on every message (`delivery_count > "3"`, `enqueued_at > "2026-…"`),
    /// or never held (`reason == 3`), without a word at compile time.
    #[test]
    fn a_variable_compared_with_a_literal_of_the_wrong_type_is_a_compile_error() {
        let at = |f: &str| match Filter::compile(f).unwrap_err() {
            FilterError::TypeMismatch {
                message, line, column, ..
            } => (message, line, column),
            other => panic!("{f}: {other:?}"),
        };
        let (message, line, column) = at(r#"delivery_count > "3""#);
        assert_eq!((line, column), (1, 18));
        assert_eq!(
            message,
            "`delivery_count` is an int (or null), which does not compare with a string; write the number without quotes"
        );
        let (message, ..) = at(r#"reason == "x" || enqueued_at > "2026-01-01T00:00:00Z""#);
        assert!(
            message.ends_with(r#"write timestamp("2026-01-01T00:00:00Z")"#),
            "{message}"
        );
        let (message, ..) = at(r#""1h" < age"#);
        assert!(message.ends_with(r#"write duration("1h")"#), "{message}");
        let (message, ..) = at("age > 3600");
        assert!(message.contains("duration(\"1h\")"), "{message}");
        let (message, ..) = at("reason == 3");
        assert!(message.contains("never equals an int"), "{message}");
        // What compares, and a macro's variable that shares a name, compile.
        for f in [
            "delivery_count > 3 && delivery_count < 4.5 && delivery_count != 2u && delivery_count != null",
            r#"reason == "x" || reason != null || description == null || source < "m" || id != "" || body > """#,
            r#"enqueued_at != null && age != null && age > duration("1h")"#,
            r#"[1].exists(age, age > 0) && ["a"].all(reason, reason == "a")"#,
            r#"attributes.n > "3" || json.n == 3"#,
        ] {
            assert!(Filter::compile(f).is_ok(), "{f}: {:?}", Filter::compile(f).unwrap_err());
        }
    }

    #[test]
    fn unknown_variable_is_a_compile_error_with_its_position() {
        let err = Filter::compile(r#"atributes.tenant == "acme""#).unwrap_err();
        assert_eq!(
            err,
            FilterError::UnknownVariable {
                name: "atributes".into(),
                line: 1,
                column: 1,
                source_line: r#"atributes.tenant == "acme""#.into(),
            }
        );
        let text = err.to_string();
        assert!(
            text.starts_with("invalid filter at 1:1: unknown variable `atributes` (the variables are: id, body"),
            "{text}"
        );
        let at = |f: &str| match Filter::compile(f).unwrap_err() {
            FilterError::UnknownVariable { name, line, column, .. } => (name, line, column),
            other => panic!("{other:?}"),
        };
        assert_eq!(at(r#"reason == "tenant" && tenant == 1"#), ("tenant".into(), 1, 23));
        assert_eq!(at("attributes.tenant == 1\n|| tenant"), ("tenant".into(), 2, 4));
        // The first in the text, not the first alphabetically.
        assert_eq!(at("zeta == 1 || alpha == 2"), ("zeta".into(), 1, 1));
        assert_eq!(at("reason == \"é😀\" ||\n\t  reasn == 1"), ("reasn".into(), 2, 4));
        let text = Filter::compile("reason == \"é😀\" ||\n\t  reasn == 1")
            .unwrap_err()
            .to_string();
        assert!(text.ends_with("\n  \t  reasn == 1\n  \t  ^"), "{text}");
    }

    /// The caret sits under its mark when the line holds wide characters.
    #[test]
    fn the_caret_counts_wide_characters_as_a_terminal_does() {
        let err = Filter::compile(r#"reason == "注文" && && true"#).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, FilterError::Syntax { column: 19, .. }), "{text}");
        let lines: Vec<&str> = text.lines().collect();
        let caret = unicode_width::UnicodeWidthStr::width(&lines[2][..lines[2].find('^').unwrap()]);
        let mark = unicode_width::UnicodeWidthStr::width(&lines[1][..lines[1].rfind("&&").unwrap()]);
        assert_eq!(caret, mark, "{text}");
        // A tab in the line is a tab in the caret line: the same tab stop.
        let text = Filter::compile("reason == \"x\" &&\n\t\t&& true")
            .unwrap_err()
            .to_string();
        assert!(text.ends_with("\n  \t\t&& true\n  \t\t^"), "{text}");
    }
    #[test]
    fn deep_nesting_and_huge_filters_are_refused_before_parsing() {
        let deep = format!("{}true{}", "(".repeat(400), ")".repeat(400));
        let e = Filter::compile(&deep).unwrap_err().to_string();
        assert!(e.contains("nested 400 levels deep at 1:400"), "{e}");
        let negations = format!("{}true", "!".repeat(100));
        assert!(
            Filter::compile(&negations)
                .unwrap_err()
                .to_string()
                .contains("nested 100")
        );
        let long = vec!["true"; 400].join(" || ");
        assert!(
            Filter::compile(&long)
                .unwrap_err()
                .to_string()
                .contains("399 operators")
        );
        let huge = format!("body.contains(\"{}\")", "x".repeat(MAX_FILTER_BYTES));
        assert!(Filter::compile(&huge).unwrap_err().to_string().contains("bytes long"));
        // A list of IDs to redrive is long but flat.
        let ids: Vec<String> = (0..300).map(|i| format!("\"{}\"", uuid::Uuid::from_u128(i))).collect();
        assert!(Filter::compile(&format!("id in [{}]", ids.join(", "))).is_ok());
        // Brackets inside strings, binary minus and `!=` are not nesting.
        assert_eq!(nesting(r#"body.contains("((((((((((((((((((((((((((((((((((")"#).0, 1);
        assert_eq!(nesting("!a && !b && !c && !d && a - -1 != 0").0, 1);
    }

    #[test]
    fn raw_and_triple_quoted_strings_do_not_hide_the_nesting_after_them() {
        let parens = |n: usize| format!("{}true{}", "(".repeat(n), ")".repeat(n));
        // In a raw string a backslash escapes nothing: `r"\"` ends there.
        for string in [
            r#"r"\""#,
            r#"R'\'"#,
            r#"br"\""#,
            r#""""a"b""""#,
            r#"'''it's'''"#,
            r#"r"""\""""#,
        ] {
            let source = format!("body == {string} && {}", parens(300));
            let e = Filter::compile(&source).unwrap_err().to_string();
            assert!(e.contains("nested 300 levels"), "{source}: {e}");
        }
        // CEL's comments: a quote in one opens no string for the parser.
        let source = format!("true // it's\n && {}\n// '", parens(300));
        let e = Filter::compile(&source).unwrap_err().to_string();
        assert!(e.contains("nested 300 levels"), "{e}");
        assert!(Filter::compile("// tenant acme only\nattributes.tenant == \"acme\" // it's theirs").is_ok());
        // The same strings, with the brackets inside them, are flat.
        assert_eq!(nesting(r#"body == r"\((((" && body == """(("((""""#).0, 0);
        assert_eq!(nesting(r#"body == "\"(((""#).0, 0);
        // A chain of member selections nests like brackets (a decimal point
        // is not one).
        for link in [".a", " . a", ".\n a"] {
            let chain = format!("json{} == 1.5", link.repeat(3000));
            let e = Filter::compile(&chain).unwrap_err().to_string();
            assert!(e.contains("nested 3000 levels"), "{link:?}: {e}");
        }
        assert_eq!(nesting("json.order.items.size() > 1.5").0, 3);
        // An index continues the chain; a list literal does not.
        let indexes = format!("json{} == 1", "[0]".repeat(3000));
        assert!(
            Filter::compile(&indexes)
                .unwrap_err()
                .to_string()
                .contains("nested 3000 levels")
        );
        assert_eq!(nesting("json.items[0].sku == 'x' && 'a' in ['a', 'b']").0, 3);
        assert_eq!(nesting("a.b(x.y.z).c").0, 3);
    }

    #[test]
    fn nested_comprehensions_are_bounded() {
        let list = "[0,1,2,3,4,5,6,7,8,9]";
        let nest = |n: usize| {
            let mut f = String::from("false");
            for level in 0..n {
                f = format!("{list}.exists(v{level}, {f})");
            }
            f
        };
        assert!(Filter::compile(&nest(MAX_COMPREHENSION_NESTING)).is_ok());
        let e = Filter::compile(&nest(MAX_COMPREHENSION_NESTING + 1))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("comprehensions (all, exists, exists_one, map, filter) nested 4 deep"),
            "{e}"
        );
        // Side by side they do not multiply.
        let flat = ["attributes.exists(k, k == 'x')"; 8].join(" || ");
        assert!(Filter::compile(&flat).is_ok());
        // Under every name the parser expands, `existsOne` too.
        for name in COMPREHENSIONS {
            let renamed = nest(MAX_COMPREHENSION_NESTING + 1).replace(".exists(", &format!(".{name}("));
            assert!(Filter::compile(&renamed).is_err(), "{renamed}");
        }
        // With a space before the bracket, too.
        for spacing in [".exists (", " . exists(", " .\n exists ("] {
            let spaced = nest(MAX_COMPREHENSION_NESTING + 1).replace(".exists(", spacing);
            assert!(Filter::compile(&spaced).is_err(), "{spaced}");
        }
        // A function of that name outside a member call is not a comprehension.
        assert_eq!(complexity("exists(exists(exists(exists(1))))").comprehensions.0, 0);
    }

    #[test]
    fn filters_at_the_limits_compile_and_run() {
        // A debug build's parser frames are ~8× a release build's: 16 MiB here
        // stands for the 2 MiB tokio worker that compiles API filters in release
        // (the fuzzer's 380-deep input compiled within 8 MiB in release).
        std::thread::Builder::new()
            .stack_size(16 << 20)
            .spawn(|| {
                let n = MAX_FILTER_NESTING;
                let deep = format!("{}delivery_count >= 0{}", "(".repeat(n), ")".repeat(n));
                let f = Filter::compile(&deep).unwrap();
                assert_eq!(f.matches(&msg(), Utc::now()), Ok(true));
                let mut chain = String::from("delivery_count");
                for _ in 1..MAX_FILTER_OPERATORS {
                    chain.push_str(" + 1");
                }
                chain.push_str(" > 0");
                let f = Filter::compile(&chain).unwrap();
                assert_eq!(f.matches(&msg(), Utc::now()), Ok(true));
                let members = format!("has(attributes{})", ".a".repeat(MAX_FILTER_NESTING - 2));
                // Evaluated, to whatever end (attribute `a` has no member `a`).
                let _ = Filter::compile(&members).unwrap().matches(&msg(), Utc::now());
            })
            .unwrap()
            .join()
            .unwrap();
    }
}
