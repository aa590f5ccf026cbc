//! `policies.authorization`: resolution, and each refusal with its position and path.

use super::*;

#[test]
fn authorization_policies_resolve() {
    let config = ok(&with_policies(&[
        "    - name: web-allow",                                            // 21
        "      selector: {app: web}",                                       // 22
        "      action: allow",                                              // 23
        "      rules:",                                                     // 24
        "        - from:",                                                  // 25
        "            identities: [\"spiffe://cluster.local/ns/a/sa/b\"]",   // 26
        "            identityPrefixes: [\"spiffe://cluster.local/ns/c/\"]", // 27
        "            namespaces: [d, e]",                                   // 28
        "          ports: [8080, 8443]",                                    // 29
        "        - ports: [9090]",                                          // 30
        "        - {}",                                                     // 31
        "    - name: web-allow",                                            // 32
        "      namespace: other",                                           // 33
        "      action: deny",                                               // 34
        "      rules: []",                                                  // 35
        "    - name: bare",                                                 // 36
    ]));
    assert_eq!(
        config.policies.authorization,
        [
            AuthorizationPolicy {
                name: "web-allow".into(),
                namespace: "default".into(),
                selector: Some(labels(&[("app", "web")])),
                action: AuthorizationAction::Allow,
                rules: vec![
                    AuthorizationRule {
                        from: Some(RuleSource {
                            identities: vec![spiffe("spiffe://cluster.local/ns/a/sa/b")],
                            identity_prefixes: vec!["spiffe://cluster.local/ns/c/".into()],
                            namespaces: vec!["d".into(), "e".into()],
                        }),
                        ports: vec![8080, 8443],
                    },
                    AuthorizationRule {
                        from: None,
                        ports: vec![9090],
                    },
                    AuthorizationRule::default(),
                ],
            },
            AuthorizationPolicy {
                name: "web-allow".into(),
                namespace: "other".into(),
                selector: None,
                action: AuthorizationAction::Deny,
                rules: vec![],
            },
            // Defaults: namespace `default`, no selector, allow, no rule.
            AuthorizationPolicy {
                name: "bare".into(),
                namespace: "default".into(),
                selector: None,
                action: AuthorizationAction::Allow,
                rules: vec![],
            },
        ]
    );
    assert_eq!(
        config.policies.authorization[1]
            .qualified_name()
            .to_string(),
        "other/web-allow"
    );
    // Precomputed per workload: both web workloads are selected by policies 0 and 2.
    for w in config.workloads() {
        let names: Vec<String> = config
            .authorization_policies_for(w)
            .map(|p| p.qualified_name().to_string())
            .collect();
        assert_eq!(names, ["default/web-allow", "default/bare"], "{}", w.name);
    }
    // `policies: {authorization: []}` and no `policies` at all are the same.
    let empty = ok(&base_with(&[], &["policies: {authorization: []}"]));
    assert_eq!(empty.policies, Policies::default());
    assert_eq!(ok(BASE).policies, Policies::default());
}

#[test]
fn authorization_unknown_fields() {
    assert_eq!(
        error(&with_policies(&["    - name: p", "      principals: []"])),
        "mesh.yaml:22:7: policies.authorization[0].principals: unknown field `principals`, \
         expected one of name, namespace, selector, action, rules"
    );
    assert_eq!(
        error(&with_policies(&[
            "    - name: p",
            "      rules:",
            "        - to: [{ports: [80]}]"
        ])),
        "mesh.yaml:23:11: policies.authorization[0].rules[0].to: unknown field `to`, expected \
         one of from, ports"
    );
    assert_eq!(
        error(&with_policies(&[
            "    - name: p",
            "      rules:",
            "        - from: {principals: [x]}"
        ])),
        "mesh.yaml:23:18: policies.authorization[0].rules[0].from.principals: unknown field \
         `principals`, expected one of identities, identityPrefixes, namespaces"
    );
    assert_eq!(
        error(&with_policies(&["    - namespace: demo"])),
        "mesh.yaml:21:7: policies.authorization[0]: missing field `name`"
    );
}

#[test]
fn authorization_bad_action() {
    assert_eq!(
        error(&with_policies(&["    - name: p", "      action: audit"])),
        "mesh.yaml:22:15: policies.authorization[0].action: unknown variant `audit`, expected \
         one of allow, deny"
    );
    assert_eq!(
        error(&with_policies(&["    - name: p", "      action: ALLOW"])),
        "mesh.yaml:22:15: policies.authorization[0].action: unknown variant `ALLOW`, expected \
         one of allow, deny"
    );
    assert_eq!(
        error(&with_policies(&["    - name: p", "      action:"])),
        "mesh.yaml:22:13: policies.authorization[0].action: must be allow or deny"
    );
}

#[test]
fn authorization_duplicate_name_in_namespace() {
    assert_eq!(
        error(&with_policies(&[
            "    - name: p",                               // 21
            "      namespace: demo",                       // 22
            "    - {name: p, namespace: other}",           // 23
            "    - {name: p, namespace: demo, rules: []}", // 24
        ])),
        "mesh.yaml:24:14: policies.authorization[2].name: authorization policy demo/p is already \
         defined at line 21"
    );
    // The default namespace counts as written.
    assert_eq!(
        error(&with_policies(&[
            "    - name: p",
            "    - {name: p, namespace: default}"
        ])),
        "mesh.yaml:22:14: policies.authorization[1].name: authorization policy default/p is \
         already defined at line 21"
    );
}

#[test]
fn authorization_names_and_selector() {
    assert_eq!(
        error(&with_policies(&["    - name: Allow_All"])),
        format!(
            "mesh.yaml:21:13: policies.authorization[0].name: `Allow_All` is not a valid policy \
             name: {SUBDOMAIN_RULE}"
        )
    );
    assert_eq!(
        error(&with_policies(&["    - {name: p, namespace: Demo}"])),
        format!(
            "mesh.yaml:21:28: policies.authorization[0].namespace: `Demo` is not a valid \
             namespace: {LABEL_RULE}"
        )
    );
    assert_eq!(
        error(&with_policies(&["    - name: p", "      selector: {}"])),
        "mesh.yaml:22:17: policies.authorization[0].selector: must not be empty (omit it to \
         apply the policy to every workload of the namespace)"
    );
    assert_eq!(
        error(&with_policies(&["    - name: p", "      selector:"])),
        "mesh.yaml:22:15: policies.authorization[0].selector: must not be empty (omit it to \
         apply the policy to every workload of the namespace)"
    );
}

#[test]
fn authorization_identities_must_be_spiffe() {
    assert_eq!(
        error(&with_policies(&[
            "    - name: p",
            "      rules:",
            "        - from:",
            "            identities: [\"spiffe://cluster.local/ns/a/sa/b\", cluster.local/ns/a/sa/c]",
        ])),
        "mesh.yaml:24:62: policies.authorization[0].rules[0].from.identities[1]: identity \
         \"cluster.local/ns/a/sa/c\" does not start with \"spiffe://\""
    );
    assert_eq!(
        error(&with_policies(&[
            "    - name: p",
            "      rules:",
            "        - from: {identityPrefixes: [\"SPIFFE://cluster.local/\"]}",
        ])),
        "mesh.yaml:23:37: policies.authorization[0].rules[0].from.identityPrefixes[0]: \
         `SPIFFE://cluster.local/` does not start with spiffe://"
    );
    assert_eq!(
        error(&with_policies(&[
            "    - name: p",
            "      rules:",
            "        - from: {identities: [\"spiffe://cluster.local\"]}",
        ])),
        "mesh.yaml:23:31: policies.authorization[0].rules[0].from.identities[0]: identity \
         \"spiffe://cluster.local\": the path must be /ns/<namespace>/sa/<serviceAccount> (use \
         identityPrefixes for a prefix)"
    );
    // An identity is parsed as those of peer certificates are: by the same name rules.
    assert_eq!(
        error(&with_policies(&[
            "    - name: p",
            "      rules:",
            "        - from: {identities: [\"spiffe://cluster.local/ns/team.a/sa/b\"]}",
        ])),
        "mesh.yaml:23:31: policies.authorization[0].rules[0].from.identities[0]: identity \
         \"spiffe://cluster.local/ns/team.a/sa/b\": bad namespace: only lower-case letters, \
         digits and '-' are allowed"
    );
    assert_eq!(
        error(&with_policies(&[
            "    - name: p",
            "      rules:",
            "        - from: {identities: [\"spiffe://cluster.local/ns/a/sa/b \"]}",
        ])),
        "mesh.yaml:23:31: policies.authorization[0].rules[0].from.identities[0]: identity \
         \"spiffe://cluster.local/ns/a/sa/b \": bad service account: only lower-case letters, \
         digits, '-' and '.' are allowed"
    );
    assert_eq!(
        error(&with_policies(&[
            "    - name: p",
            "      rules:",
            "        - from: {identityPrefixes: [\"spiffe://cluster.local/ns/a \"]}",
        ])),
        "mesh.yaml:23:37: policies.authorization[0].rules[0].from.identityPrefixes[0]: \
         `spiffe://cluster.local/ns/a ` contains a blank or control character"
    );
    assert_eq!(
        error(&with_policies(&[
            "    - name: p",
            "      rules:",
            "        - from: {namespaces: [demo, Prod]}",
        ])),
        format!(
            "mesh.yaml:23:37: policies.authorization[0].rules[0].from.namespaces[1]: `Prod` is \
             not a valid namespace: {LABEL_RULE}"
        )
    );
    // A bare `spiffe://` prefix (any authenticated source) is fine.
    ok(&with_policies(&[
        "    - name: p",
        "      rules: [{from: {identityPrefixes: [\"spiffe://\"]}}]",
    ]));
}

#[test]
fn authorization_ports() {
    assert_eq!(
        error(&with_policies(&[
            "    - name: p",
            "      rules: [{ports: [80, 0]}]"
        ])),
        "mesh.yaml:22:28: policies.authorization[0].rules[0].ports[1]: port 0 is out of range \
         1..=65535"
    );
    assert_eq!(
        error(&with_policies(&[
            "    - name: p",
            "      rules:",
            "        - ports: [65535]",
            "        - ports: [65536]",
        ])),
        "mesh.yaml:24:19: policies.authorization[0].rules[1].ports[0]: port 65536 is out of \
         range 1..=65535"
    );
    assert_eq!(
        error(&with_policies(&[
            "    - name: p",
            "      rules: [{ports: [80, 80]}]"
        ])),
        "mesh.yaml:22:28: policies.authorization[0].rules[0].ports[1]: port 80 is listed twice"
    );
    assert_eq!(
        error(&with_policies(&[
            "    - name: p",
            "      rules: [{ports: []}]"
        ])),
        "mesh.yaml:22:23: policies.authorization[0].rules[0].ports: must list at least one port \
         (omit `ports` for any)"
    );
    assert_eq!(
        error(&with_policies(&[
            "    - name: p",
            "      rules:",
            "        - ports:"
        ])),
        "mesh.yaml:23:16: policies.authorization[0].rules[0].ports: must list at least one port \
         (omit `ports` for any)"
    );
}

#[test]
fn authorization_empty_from_and_lists() {
    assert_eq!(
        error(&with_policies(&[
            "    - name: p",
            "      rules: [{from: {}}]"
        ])),
        "mesh.yaml:22:22: policies.authorization[0].rules[0].from: must set at least one of \
         identities, identityPrefixes, namespaces (omit `from` to match any source)"
    );
    assert_eq!(
        error(&with_policies(&[
            "    - name: p",
            "      rules:",
            "        - from:",
            "          ports: [80]",
        ])),
        "mesh.yaml:23:15: policies.authorization[0].rules[0].from: must set at least one of \
         identities, identityPrefixes, namespaces (omit `from` to match any source)"
    );
    assert_eq!(
        error(&with_policies(&[
            "    - name: p",
            "      rules: [{from: {identities: []}}]"
        ])),
        "mesh.yaml:22:35: policies.authorization[0].rules[0].from.identities: must list at \
         least one identity (omit `identities` for any)"
    );
    assert_eq!(
        error(&with_policies(&[
            "    - name: p",
            "      rules:",
            "        - from:",
            "            namespaces:",
        ])),
        "mesh.yaml:24:23: policies.authorization[0].rules[0].from.namespaces: must list at \
         least one namespace (omit `namespaces` for any)"
    );
    assert_eq!(
        error(&with_policies(&["    - name: p", "      rules:"])),
        "mesh.yaml:22:12: policies.authorization[0].rules: must be a list of rules"
    );
}
